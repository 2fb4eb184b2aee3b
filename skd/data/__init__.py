"""Data: WebDataset shards (``skd shard``), their index, the torch loader, the digits demo data."""
from skd.data.dataset_info import DatasetInfo, DatasetInfoError, ShardInfo
from skd.data.digits import digits_shards
from skd.data.epoch_plan import EpochPlan, plan_epoch
from skd.data.loader import CorruptDataError, ShardLoader, create_loader
from skd.data.partners import PartnerSampler
from skd.data.paths import resolve_shard_dir
from skd.data.sample_index import SampleIndex, ShardFormatError, index_shards
from skd.data.shard_writer import ImageFolderError, ShardSetWriter

__all__ = ["DatasetInfo", "DatasetInfoError", "ShardInfo", "digits_shards", "EpochPlan", "plan_epoch",
           "CorruptDataError", "ShardLoader", "create_loader", "PartnerSampler", "resolve_shard_dir",
           "SampleIndex", "ShardFormatError", "index_shards", "ImageFolderError", "ShardSetWriter"]
