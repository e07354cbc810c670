import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Weights of the seconds-long training configuration (the shipped ones are not needed)."""
    from py4dstem_prenet.training import TrainConfig, train_all

    d = str(tmp_path_factory.mktemp("w"))
    train_all(d, TrainConfig.tiny(), log=lambda m: None)
    return d
