import pytest
import torch

from dafl.errors import ConfigError
from dafl.models import build_model
from dafl.weights import load_classifier, read_metadata, save_classifier


def test_safetensors_round_trip_with_metadata(tmp_path):
    net = build_model("lenet5_half")
    path = tmp_path / "m.safetensors"
    save_classifier(path, net, {"arch": "lenet5_half", "num_classes": 10, "in_channels": 1, "image_size": 32,
                                "mean": [0.5], "class_names": ["a", "b"]})
    assert read_metadata(path)["mean"] == [0.5]
    loaded, meta = load_classifier(path)
    assert meta["arch"] == "lenet5_half"
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x), net(x))


def test_plain_state_dict_needs_arch_and_loads_weights_only(tmp_path):
    net = build_model("lenet5")
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ConfigError, match="teacher_arch"):
        load_classifier(path)
    loaded, _ = load_classifier(path, arch="lenet5")
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(loaded(x), net(x))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(ConfigError, match="refusing to load"):
        load_classifier(path, arch="lenet5")
    assert not marker.exists()


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_model("lenet5_half").state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit lenet5"):
        load_classifier(path, arch="lenet5")


def test_shape_mismatch_against_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_classifier(path, build_model("lenet5"), {"arch": "lenet5", "num_classes": 10, "in_channels": 1,
                                                  "image_size": 32})
    with pytest.raises(ConfigError, match="num_classes=10"):
        load_classifier(path, num_classes=100)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04garbage"])
def test_corrupt_files(tmp_path, content):
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(ConfigError):
            load_classifier(path, arch="lenet5")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_classifier(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("metas, message", [
    ([{"num_classes": 2, "classes": [0, 1]}, {"num_classes": 2, "classes": [1, 2]}], "class 1 is known by both a and b"),
    ([{"num_classes": 2, "classes": [0, 1, 2]}], "a lists 3 classes but has 2 outputs"),
])
def test_teachers_class_lists_are_checked(metas, message):
    from dafl.weights import known_classes

    with pytest.raises(ConfigError, match=message):
        known_classes(["a", "b"][:len(metas)], metas)


def test_uneven_class_lists_are_read_from_metadata_or_outputs():
    from dafl.weights import known_classes

    metas = [{"num_classes": 4, "classes": [0, 1, 2, 3]}, {"num_classes": 3, "classes": [4, 5, 6]}]
    assert known_classes(["a", "b"], metas) == [[0, 1, 2, 3], [4, 5, 6]]
    assert known_classes(["all"], [{"num_classes": 3}]) == [[0, 1, 2]]  # no subset recorded: every output
