"""The fold engine: a plan carried out in three steps, structure, recipes and compute (``execute``); calibration
statistics measured block by block (``calibrate``); and the sequential refit on the folded model's own inputs
(``sequential``)."""
