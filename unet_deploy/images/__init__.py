"""Images and masks: decoding (formats allowlisted) and the one preprocessing, logits to masks, dense CRF, dice,
RLE, overlays, synthetic Carvana-like data and training augmentation. No model runtime here."""
