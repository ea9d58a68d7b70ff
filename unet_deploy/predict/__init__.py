"""The prediction file pipeline: inputs -> masks on disk, overlays and a Kaggle submission.

::

    expand_inputs(files | folders | globs)   ordered, de-duplicated                       (.plan)
    plan_jobs(inputs, outputs)              <stem>_OUT.png beside the input, -o names or an -o folder
    iter_predictions(backend, jobs, opts)   load_image on threads                         (.load)
                                            -> preprocess -> backend (batched, [flip TTA]) (.batch)
                                            -> probabilities / mask at the original size
                                            -> [dense CRF]                                 (.postprocess)
                                            yields one PredictResult per job, in input order (.run)
    predict_arrays(backend, images, opts)   the same stages for decoded images (the Python API, serve)
    predict_files(backend, inputs, opts)    writes masks / overlays (.write, .overlay) and the RLE
                                            submission through a resumable journal (.resume);
                                            returns a PredictSummary                      (.run)

Options, jobs, results and the summary are in :mod:`.records`. A bad input file never stops a run: its
result carries a one-line ``error`` and the others go on.
"""

from __future__ import annotations

from unet_deploy.images.image_io import FINGERPRINT_KEY, MASK_SUFFIX, OVERLAY_SUFFIX
from unet_deploy.images.overlay import overlay_image
from unet_deploy.predict.driver import iter_predictions, predict_arrays, predict_files
from unet_deploy.predict.plan import check_rle_target, default_model, expand_inputs, plan_jobs
from unet_deploy.predict.records import (
    Job,
    PredictInterrupted,
    PredictOptions,
    PredictResult,
    PredictSummary,
    crf_setting,
)
from unet_deploy.predict.resume import run_fingerprint
from unet_deploy.predict.write import mask_fingerprint, output_values, write_mask, write_overlay

__all__ = [
    "PredictOptions", "Job", "PredictResult", "PredictSummary", "expand_inputs", "plan_jobs",
    "iter_predictions", "predict_arrays", "predict_files", "write_mask", "write_overlay", "overlay_image",
    "default_model", "output_values", "check_rle_target", "run_fingerprint", "mask_fingerprint",
    "MASK_SUFFIX", "OVERLAY_SUFFIX", "FINGERPRINT_KEY", "PredictInterrupted", "crf_setting",
]
