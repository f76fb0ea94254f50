"""Files: 68-point ``.pts`` landmark files, 300-W folders. The bottom layer: imports nothing else
from ectfast."""
