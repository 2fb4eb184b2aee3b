"""Data: WebDataset shards (``skd shard``), their index, the torch loader, the digits demo data."""
from skd.data.dataset_info import DatasetInfo, DatasetInfoError, ShardInfo
from skd.data.digits import digits_shards
from skd.data.loader import ShardLoader, create_loader, plan_epoch
from skd.data.partners import PartnerSampler
from skd.data.sample_index import SampleIndex, ShardFormatError, index_shards
from skd.data.shard_writer import ImageFolderError, ShardSetWriter, shard_image_folder
