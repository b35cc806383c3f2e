"""Configs: derived fields, one config.json, clear errors, and no torch in the configuration files."""

import ast
from pathlib import Path

import pytest
from tiny import IMAGE_ID, bridge_config, text_config, vision_config, vlm_config

import vlbridge
from vlbridge import BridgeVLMConfig, MLPProjectorConfig, PerceiverResamplerConfig, QFormerConfig


CONFIG_DIR = Path(vlbridge.__file__).parent / "configuration"


def test_configuration_files_import_no_torch():
    for path in CONFIG_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name == "torch" or name.startswith("torch.") for name in names), path.name


@pytest.mark.parametrize("bridge,expected", [("qformer", 4), ("perceiver", 4), ("mlp", 16)])
def test_derived_fields(bridge, expected):
    config = vlm_config("clip", bridge, "opt")
    assert config.bridge_config.encoder_hidden_size == config.vision_config.hidden_size == 32
    assert config.num_image_tokens == expected  # MLP: 4x4 patches + CLS - dropped CLS
    assert config.image_seq_length == expected and config.image_token_index == IMAGE_ID
    assert not config.is_encoder_decoder and config.use_decoder_only_language_model
    t5 = vlm_config("siglip", bridge, "t5")
    assert t5.is_encoder_decoder and not t5.use_decoder_only_language_model


def test_saved_as_one_config_json_and_reloaded(tmp_path):
    config = vlm_config("siglip", "perceiver", "llama", vision_feature_layer=-2)
    config.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    loaded = BridgeVLMConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.bridge_config, PerceiverResamplerConfig)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.get_text_config().model_type == "llama"


def test_bridge_configs_round_trip(tmp_path):
    for config in (QFormerConfig(num_query_tokens=8), PerceiverResamplerConfig(num_latents=16), MLPProjectorConfig()):
        config.save_pretrained(tmp_path / config.model_type)
        loaded = type(config).from_pretrained(tmp_path / config.model_type)
        assert loaded.to_dict() == config.to_dict()


def test_bridge_width_follows_vision_tower():
    config = BridgeVLMConfig(
        vision_config=vision_config("clip", hidden_size=64),
        bridge_config=bridge_config("qformer"),
        text_config=text_config("opt"),
        image_token_id=IMAGE_ID,
    )
    assert config.bridge_config.encoder_hidden_size == 64


def test_clear_errors():
    with pytest.raises(ValueError, match="drop_cls_token=False"):
        BridgeVLMConfig(
            vision_config=vision_config("siglip"),
            bridge_config=bridge_config("mlp", drop_cls_token=True),
            text_config=text_config("llama"),
        )
    with pytest.raises(ValueError, match="use_text_input=True"):
        vlm_config(use_qformer_text_input=True, bridge="perceiver")
    with pytest.raises(ValueError, match="vision_num_prefix_tokens"):
        BridgeVLMConfig(
            vision_config={"model_type": "swin", "embed_dim": 16, "depths": [1], "num_heads": [2]},
            bridge_config=bridge_config("mlp"),
            text_config=text_config("llama"),
        )
    with pytest.raises(Exception, match="multiple of num_attention_heads"):
        QFormerConfig(hidden_size=30, num_attention_heads=4)
