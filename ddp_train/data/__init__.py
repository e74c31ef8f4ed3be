"""Data: what a dataset is (types), where datasets come from (sources, imagefolder), how a rank gets its
batches (batches) and the randomness that is a function of the sample (augment)."""
from .batches import EvalBatches, TrainBatches, use_device_resident, worker_count
from .sources import SOURCES, Source, load, load_distributed
from .types import DataInfo, ImageTensors, Splits

__all__ = ["EvalBatches", "TrainBatches", "use_device_resident", "worker_count", "SOURCES", "Source", "load",
           "load_distributed", "DataInfo", "ImageTensors", "Splits"]
