"""Bad command-line values are refused with a message instead of being silently replaced
(found by trying the CLI as a new user)."""
import pytest
import torch

from llp_pretrain.cli import main as cli_main
from llp_pretrain.models import ModelConfig, build_model


def test_compare_refuses_an_empty_variant_list(capsys):
    assert cli_main(["compare", "--config", "configs/compare/kjv_tiny.yaml", "--variants", " , "]) == 2
    assert "--variants is empty" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, msg", [({"top_p": 2.0}, "top_p"), ({"top_p": 0.0}, "top_p"),
                                         ({"top_k": 0}, "top_k"), ({"temperature": -1.0}, "temperature")])
def test_generate_refuses_out_of_range_sampling_options(kwargs, msg):
    model = build_model(ModelConfig(variant="llp", vocab_size=20, d_model=8, n_heads=2, n_layers=1, seq_len=8,
                                    segment_len=4))
    with pytest.raises(ValueError, match=msg):
        model.generate(torch.tensor([1, 2, 3]), 4, **kwargs)
    assert model.generate(torch.tensor([1, 2, 3]), 4, top_p=1.0, top_k=1, temperature=0.0).shape == (7,)
