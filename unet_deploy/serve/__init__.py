"""``unet-deploy serve``: the prediction path of ``predict`` over HTTP, with dynamic micro-batching.

::

    options (.options)  ->  load model, metrics, engine (.run)  ->  Starlette app (.app) under uvicorn
    POST /v1/predict: admit (503 when full) -> read upload (413) -> decode (.decode: 415/400/413)
                      -> preprocess -> MicroBatcher (.batcher) -> model thread -> mask or CRF (.engine)
                      -> encode png | rle | json | overlay
    GET / (.page), /healthz, /readyz, /metrics (.metrics), /v1/model
    /v2/...: the Open Inference Protocol (.oip; bodies: .oip_codec), the same path as POST /v1/predict

Needs starlette, uvicorn, prometheus_client and python-multipart (dependencies of the package); nothing
here is imported by the other commands, so they run where those are missing.
"""
