"""What people run, as functions that return data and raise typed errors (``uniseg_hub.cli`` prints them):
``predict`` (a scan), ``demo`` (the sample CT, and ``agreement``: its Dice against TotalSegmentator's map),
``report`` (preview PNG, volume tables), ``prepare`` (downstream datalists), ``publish`` (a converted folder to the
Hub), ``export`` (ONNX), ``sample_data`` (the demo's scans), ``bundle`` (where the MONAI bundle is)."""
