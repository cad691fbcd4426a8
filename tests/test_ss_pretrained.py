"""SSConfig, an adapter saved with its config (save_pretrained / from_pretrained) and load_learner."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from test_pipeline import SIDE, tiny_benchmark, tiny_config

from mtl_plugin import SSAdapter, SSConfig, load_learner
from mtl_plugin.backbones import build_backbone, conv4
from mtl_plugin.bench.methods.mtl import MTLConfig
from mtl_plugin.errors import DataError, MissingDataError
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.training.checkpoints import encoder_record
from mtl_plugin.training.meta_training import meta_train
from mtl_plugin.training.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(adapter: SSAdapter) -> SSAdapter:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapter.ss_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return adapter


def test_ss_config_checks_and_spells_the_options_once():
    assert SSConfig() == SSConfig("auto", "frozen", None, False)
    assert SSConfig.paper().granularity == "kernel" and MTLConfig().ss == SSConfig.paper()
    assert SSConfig(layers="layer4").layers == ("layer4",) and SSConfig(layers=["a", "b"]).layers == ("a", "b")
    with pytest.raises(ValueError, match="unknown granularity 'block'; valid: auto, kernel, channel"):
        SSConfig(granularity="block")
    with pytest.raises(ValueError, match="unknown bn mode"):
        SSConfig(bn="eval")
    with pytest.raises(ValueError, match="granularity='channel'"):
        SSConfig(output_scaling=True)
    with pytest.raises(ValueError, match="module names"):
        SSConfig(layers=lambda name, layer: True)
    # The record leaves out what is at its default, as records were before those fields existed.
    assert SSConfig.paper().to_dict() == {"granularity": "kernel", "bn": "frozen"}
    full = SSConfig("channel", "train", ("layers.12",), True)
    assert full.to_dict() == {"granularity": "channel", "bn": "train", "layers": ["layers.12"], "output_scaling": True}
    assert SSConfig.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    with pytest.raises(ValueError, match="unknown SS option 'rank'"):
        SSConfig.from_dict({"rank": 4}, "x.json")


def test_an_adapter_gives_back_its_config():
    assert SSAdapter(conv4()).config == SSConfig()
    given = SSConfig("channel", "train", ("layers.8", "layers.12"), True)
    assert SSAdapter.from_config(conv4(), given).config == given
    # A predicate is recorded as the names of the layers it selected.
    picked = SSAdapter(conv4(), layers=lambda name, layer: name in ("layers.4", "layers.12"))
    assert picked.config.layers == ("layers.4", "layers.12")
    assert SSAdapter.from_config(conv4(), picked.config).conv_names == picked.conv_names


def test_save_pretrained_and_from_pretrained_rebuild_the_adapter(tmp_path):
    torch.manual_seed(0)
    backbone = conv4()
    fresh = conv4()
    fresh.load_state_dict(backbone.state_dict())
    adapter = _perturbed(
        SSAdapter(backbone, granularity="channel", layers=["layers.8", "layers.12"], output_scaling=True)
    )
    folder = adapter.save_pretrained(tmp_path / "ss")
    assert sorted(os.listdir(folder)) == ["ss_config.json", "ss_weights.pt"]
    assert json.loads((folder / "ss_config.json").read_text()) == adapter.config.to_dict()
    # Tensors only: the safe loader reads them.
    assert set(torch.load(folder / "ss_weights.pt", weights_only=True)) == set(adapter.ss_state_dict())
    mode = stat.S_IMODE((folder / "ss_weights.pt").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    again = SSAdapter.from_pretrained(folder, fresh)
    assert again.config == adapter.config
    images = torch.randn(2, 3, 84, 84)
    assert torch.equal(again.eval()(images), adapter.eval()(images))
    with pytest.raises(ValueError, match="does not fit this backbone"):
        SSAdapter.from_pretrained(folder, conv4(hidden=16))


def test_from_pretrained_names_a_folder_that_holds_no_adapter(tmp_path):
    with pytest.raises(MissingDataError, match="no ss_config.json there.*save_pretrained"):
        SSAdapter.from_pretrained(tmp_path / "none", conv4())
    folder = SSAdapter(conv4()).save_pretrained(tmp_path / "ss")
    (folder / "ss_config.json").write_text('{"granularity": "block"}')
    with pytest.raises(DataError, match="not the config of an SS adapter.*unknown granularity 'block'"):
        SSAdapter.from_pretrained(folder, conv4())
    (folder / "ss_config.json").write_text("[1]")
    with pytest.raises(DataError, match="not the config of an SS adapter"):
        SSAdapter.from_pretrained(folder, conv4())


def _meta_trained(tmp_path, ss: SSConfig, model_info: bool = True):
    bench = tiny_benchmark()
    torch.manual_seed(0)
    backbone = build_backbone("conv4", in_channels=1, image_size=SIDE)
    learner = MetaTransferLearner(
        SSAdapter.from_config(backbone, ss), ways=3, config=tiny_config(iterations=2, val_every=2, val_tasks=2)
    )
    record = {"backbone": "conv4", "in_channels": 1, "image_size": SIDE, **encoder_record(ss)}
    meta_train(learner, bench, tmp_path / "meta", progress=False, model_info=record if model_info else None)
    return learner, tmp_path / "meta" / "best.pt"


def test_load_learner_rebuilds_a_meta_trained_learner(tmp_path):
    ss = SSConfig(granularity="channel", output_scaling=True)
    trained, best = _meta_trained(tmp_path, ss)
    learner = load_learner(best)
    assert learner.encoder.config == ss and learner.config == trained.config
    assert all(torch.equal(value, trained.state_dict()[name]) for name, value in learner.state_dict().items())
    # A record written before output_scaling was recorded reads as weight scaling, as it was then built.
    state = torch.load(best, weights_only=True)
    assert state["model"]["output_scaling"] is True
    del state["model"]["output_scaling"]
    torch.save(state, tmp_path / "old.pt")
    assert load_learner(tmp_path / "old.pt").encoder.config == SSConfig(granularity="channel")


def test_load_learner_refuses_what_it_cannot_rebuild(tmp_path):
    _, best = _meta_trained(tmp_path, SSConfig.paper(), model_info=False)
    with pytest.raises(DataError, match="does not record its model.*model_info") as caught:
        load_learner(best)
    assert "in Python" not in str(caught.value)
    pretrain(
        tiny_benchmark(),
        PretrainConfig(backbone="conv4", epochs=1, batch_size=16, val_tasks=2, val_ways=3, val_queries=3),
        tmp_path / "pre",
        progress=False,
    )
    with pytest.raises(DataError, match="load_pretrained"):
        load_learner(tmp_path / "pre" / "best.pt")
