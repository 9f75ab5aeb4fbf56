"""Classifier networks: 1-channel stems, Monte-Carlo dropout, pretrained torchvision state_dict files."""

import pytest
import torch
import torchvision

from covidxray.config import resolve_config
from covidxray.errors import CovidXrayError
from covidxray.models import DataSpec, get_model
from covidxray.models.classifiers import load_pretrained

TORCHVISION = {"resnet18": ("conv1.weight", "fc."), "densenet121": ("features.conv0.weight", "classifier."),
               "inception_v3": ("Conv2d_1a_3x3.conv.weight", "fc.")}


def _net(name, size=64, *sets, k=3):
    torch.manual_seed(0)
    return get_model(name).build(resolve_config(name, sets=list(sets)), DataSpec.example(size, k))["net"]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_the_stem_takes_one_channel(name):
    net = _net(name, 75)
    stem = net.backbone.get_submodule(TORCHVISION[name][0].rsplit(".", 1)[0])
    assert stem.in_channels == 1
    with pytest.raises(ValueError, match="expected grayscale images N x 1 x H x W, got shape"):
        net(torch.zeros(2, 3, 75, 75))


def test_mc_dropout_passes_share_the_backbone_and_differ():
    net = _net("smallcnn", 64, "model.mc_dropout=0.5").eval()
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    out = net(x, mc_samples=6)
    assert out.shape == (6, 4, 3)
    assert not torch.allclose(out[0], out[1])  # independent masks
    assert torch.equal(net(x), net(x))  # a single pass in eval mode is deterministic
    plain = _net("smallcnn", 64).eval()
    with pytest.raises(ValueError, match="mc_samples > 1 needs a model built with Monte-Carlo dropout"):
        plain(x, mc_samples=2)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_pretrained_3_channel_state_dict_is_summed_to_one_channel(name, tmp_path):
    stem_key, head = TORCHVISION[name]
    torch.manual_seed(1)
    tv = getattr(torchvision.models, name)(weights=None)
    path = tmp_path / f"{name}.pt"
    torch.save(tv.state_dict(), path)
    net = _net(name)
    counts = load_pretrained(net, path)
    own = net.backbone.state_dict()
    saved = tv.state_dict()
    assert torch.allclose(own[stem_key], saved[stem_key].sum(1, keepdim=True))
    for key, value in saved.items():
        if key != stem_key and not key.startswith(head):
            assert torch.equal(own[key], value), key
    assert counts["skipped_head"] == 2 and counts["loaded"] == len(own)
    assert net.fc.weight.shape == (3, net.n_features)  # the 3-class head is not ImageNet's


def test_pretrained_densenet_file_with_torchvisions_old_key_names(tmp_path):
    # torchvision's own download of DenseNet-121 spells denselayer keys "norm.1" and, being older than
    # PyTorch 0.4.1, has no BatchNorm num_batches_tracked counters
    tv = torchvision.models.densenet121(weights=None)
    old = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.").replace("norm2.", "norm.2.")
           .replace("conv2.", "conv.2.") if "denselayer" in k else k: v
           for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any("norm.1." in k for k in old)
    torch.save(old, tmp_path / "d.pth")
    net = _net("densenet121")
    load_pretrained(net, tmp_path / "d.pth")
    assert torch.equal(net.backbone.state_dict()["features.denseblock1.denselayer1.norm1.weight"],
                       tv.state_dict()["features.denseblock1.denselayer1.norm1.weight"])


def test_pretrained_file_problems_are_one_line_errors(tmp_path):
    net = _net("resnet18")
    with pytest.raises(CovidXrayError, match="pretrained weights file .*missing.pt does not exist"):
        load_pretrained(net, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CovidXrayError, match="junk.pt is not a readable torch state_dict file"):
        load_pretrained(net, tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "nodict.pt")
    with pytest.raises(CovidXrayError, match="holds no state_dict"):
        load_pretrained(net, tmp_path / "nodict.pt")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(CovidXrayError) as err:
        load_pretrained(net, tmp_path / "r34.pt")
    assert "r34.pt does not fit resnet18: keys" in str(err.value) and "unexpected (e.g. layer1.2." in str(err.value)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["conv1.weight"] = sd["conv1.weight"][:, :2]
    torch.save(sd, tmp_path / "two.pt")
    with pytest.raises(CovidXrayError, match=r"first-layer weights 'conv1.weight' have shape \(64, 2, 7, 7\)"):
        load_pretrained(net, tmp_path / "two.pt")
    with pytest.raises(CovidXrayError, match="applies to the torchvision classifiers"):
        load_pretrained(_net("smallcnn"), tmp_path / "r34.pt")


def test_a_run_starts_from_the_pretrained_file_and_resumes_without_it(clf_cfg, tmp_path):
    from covidxray.train.loop import resume_run, start_run

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-weights.pt"
    torch.save(tv.state_dict(), path)
    cfg = clf_cfg(epochs=2, model="resnet18", extra=[f"model.pretrained={path}", "optim.lr=1e-12",
                                                     "optim.weight_decay=0", "aug.rotate=0"])

    def stop(trainer):
        if trainer.step == 1:
            trainer.request_stop()

    trainer, finished = start_run(cfg, on_step=stop)
    assert not finished
    log = (trainer.run_dir / "log.txt").read_text()
    assert "pretrained: 120 tensors from" in log and "2 head tensors left out" in log
    # after one step at lr 1e-12 the weights are still the file's (summed stem)
    own = trainer.task.net.backbone.state_dict()
    assert torch.allclose(own["conv1.weight"], tv.state_dict()["conv1.weight"].sum(1, keepdim=True), atol=1e-6)
    path.unlink()  # a resume restores the checkpoint's weights and does not need the file
    resumed, finished = resume_run(trainer.run_dir)
    assert finished
