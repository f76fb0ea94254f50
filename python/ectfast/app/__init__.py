"""The application: the detector pipeline (faces -> crops -> network -> fit), evaluation and the
fit benchmark. Imports every layer below it."""
