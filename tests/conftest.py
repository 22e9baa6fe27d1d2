import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray in this process."""
    import ray

    if not ray.is_initialized():
        from volvlp_ray.train.trainer import start_local_ray

        start_local_ray(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
