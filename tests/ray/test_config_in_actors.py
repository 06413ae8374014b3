"""The resolved config and the task world travel to Ray actors unchanged."""

from __future__ import annotations

import numpy as np

from envs.datasets import load_dataset
from envs.rewards import MultiObjectiveReward
from raysys.config_io import load_config
from raysys.data import dataset_for_split


class _Scorer:
    """A stand-in actor body: builds its data and reward objective from the config it is given."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.samples = dataset_for_split(cfg.data, "train", load=load_dataset)
        self.reward = MultiObjectiveReward(cfg.reward)

    def config(self):
        return self.cfg

    def score_gt(self, index: int) -> tuple[str, float, str]:
        s = self.samples[index]
        r = self.reward(s.mask, s.mask, s.fov)
        return s.id, r.total, r.source


def test_config_and_rewards_match_inside_an_actor(ray_local) -> None:
    cfg = load_config(None, ["data.n_train=2", "data.size=96", "reward.weights.dice=0.7"])
    actor = ray_local.remote(num_cpus=0.5)(_Scorer).remote(cfg)
    assert ray_local.get(actor.config.remote()) == cfg
    local = _Scorer(cfg)
    for i in range(2):
        remote_id, remote_total, source = ray_local.get(actor.score_gt.remote(i))
        local_id, local_total, _ = local.score_gt(i)
        assert remote_id == local_id
        assert source == "gt"
        assert np.isclose(remote_total, local_total)


def test_workers_of_a_private_ray_name_their_own_cluster(ray_local) -> None:
    # Ray's state API in a worker (Train's placement-group cleaner) would otherwise resolve the address from
    # the machine's last `ray start`, which can be stale or another cluster.
    import os

    @ray_local.remote(num_cpus=0.1)
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray_local.get(address.remote()) == ray_local.get_runtime_context().gcs_address


def test_placement_in_an_actor_names_its_reservation_and_in_the_driver_its_node(ray_local) -> None:
    """An actor class built in the driver (tests, local debugging) reports where it is, not a Ray assertion."""
    from raysys.placement import placement

    driver = placement()
    assert driver["node_id"] and "resources" not in driver
    remote = ray_local.get(ray_local.remote(num_cpus=0.5)(_Placed).remote().where.remote())
    assert remote["node_id"] == driver["node_id"] and remote["resources"] == {"CPU": 0.5}


class _Placed:
    def where(self) -> dict:
        from raysys.placement import placement

        return placement()
