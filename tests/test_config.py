import pytest

from conceptevo import ConceptEvoError
from conceptevo.config import load_config

GOOD = """
[study]
out = "study"
[data]
kind = "synthetic"
pool = 500
[[models]]
name = "a"
arch = "vgg_like"
checkpoints = "runs/a"
[embedding]
dim = 8
"""


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_good_config_resolves_paths(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert c.out == str(tmp_path / "study")
    assert c.models[0].checkpoints == str(tmp_path / "runs" / "a")
    assert c.embedding.dim == 8 and c.embedding.negatives == 3 and c.base_model == "a"


@pytest.mark.parametrize("bad, match", [
    (GOOD.replace("dim = 8", "dimm = 8"), "'dimm'.*Did you mean 'dim'"),
    (GOOD.replace("dim = 8", "dim = 0"), "embedding.dim"),
    (GOOD.replace("dim = 8", "lr = -1.0"), "embedding.lr"),
    (GOOD.replace("dim = 8", 'dim = "thirty"'), "dim must be a number"),
    (GOOD.replace("[embedding]", "[embeding]"), "'embeding'.*Did you mean 'embedding'"),
    (GOOD.replace("dim = 8", 'lr_schedule = "cosine"'), "embedding.lr_schedule must be one of 'linear', 'constant'"),
    (GOOD.replace("dim = 8", "tol = -0.1"), "embedding.tol must be a finite number >= 0"),
    (GOOD.replace("dim = 8", "check_every = 0"), "embedding.check_every"),
    (GOOD.replace("dim = 8", "patience = 0"), "embedding.patience"),
    (GOOD.replace("dim = 8", 'early_stop = "yes"'), "early_stop must be true or false"),
    (GOOD.replace("dim = 8", "early_stopping = true"), "'early_stopping'.*Did you mean 'early_stop'"),
    (GOOD + '\n[base]\nmodel = "b"\n', "base model 'b' is not in the study"),
    (GOOD.replace('arch = "vgg_like"\n', ""), "missing 'arch'"),
    (GOOD.replace("[[models]]", "[[modelz]]"), "modelz"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_configs(tmp_path, bad, match):
    with pytest.raises(ConceptEvoError, match=match):
        load_config(write(tmp_path, bad))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConceptEvoError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
