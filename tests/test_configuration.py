"""Configs: derived fields, one config.json, clear errors, and no torch in the configuration files."""

import ast
import json
from pathlib import Path

import pytest
from tiny import IMAGE_ID, bridge_config, text_config, vision_config, vlm_config

import vlbridge
from vlbridge import (
    BridgeVLMConfig,
    MLPProjectorConfig,
    PerceiverResamplerConfig,
    QFormerConfig,
    QFormerPretrainingConfig,
)


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


def tiny_vlm_config(**kwargs) -> BridgeVLMConfig:
    """`tiny.vlm_config` with any `image_token_id`."""
    return BridgeVLMConfig(
        vision_config=vision_config("clip"),
        bridge_config=bridge_config("qformer"),
        text_config=text_config("opt"),
        **kwargs,
    )


def test_default_config_and_unset_image_token_build():
    # transformers builds `BridgeVLMConfig()` itself (e.g. in `to_diff_dict`), and the id may be set later.
    assert BridgeVLMConfig().image_token_id is None
    assert tiny_vlm_config(image_token_id=None).image_token_id is None


@pytest.mark.parametrize("image_token_id", [96, 1000, -1])
def test_image_token_id_outside_the_vocabulary_is_refused_at_build(image_token_id):
    # tiny.text_config has 96 ids: 96 is one past the end, as after adding <image> without resizing.
    with pytest.raises(
        ValueError, match=r"outside the language model's vocabulary \[0, 96\).*resize_token_embeddings"
    ):
        tiny_vlm_config(image_token_id=image_token_id)
    assert tiny_vlm_config(image_token_id=95).image_token_id == 95


def test_vision_feature_layer_must_index_the_hidden_states():
    # The tiny vision towers have 2 layers, hence 3 hidden states: -3 .. 2.
    for layer in (-3, -1, 0, 2):
        assert vlm_config(vision_feature_layer=layer).vision_feature_layer == layer
    for layer in (-4, 3):
        with pytest.raises(ValueError, match="from -3 to 2"):
            vlm_config(vision_feature_layer=layer)
    with pytest.raises(Exception, match="from -3 to 2"):
        QFormerPretrainingConfig(vision_config=vision_config("clip"), vision_feature_layer=5)


def test_bridge_token_count_must_be_positive():
    with pytest.raises(ValueError, match="num_query_tokens must be >= 1"):
        QFormerConfig(num_query_tokens=0)
    with pytest.raises(ValueError, match="num_latents must be >= 1"):
        PerceiverResamplerConfig(num_latents=-1)
    with pytest.raises(ValueError, match="num_query_tokens must be >= 1"):
        BridgeVLMConfig(bridge_config={"model_type": "vlbridge_qformer", "num_query_tokens": 0})
    # A vision tower whose only feature is the CLS token the MLP projector drops.
    with pytest.raises(ValueError, match="drop_cls_token=False"):
        BridgeVLMConfig(
            vision_config=vision_config("clip", image_size=4, patch_size=8),
            bridge_config=bridge_config("mlp", drop_cls_token=True),
            text_config=text_config("llama"),
        )


@pytest.mark.parametrize("instruct", [False, True])
def test_qformer_text_branch_follows_instructblip_mode(instruct):
    # The README's QFormerConfig() keeps use_text_input=True; inside a VLM only InstructBLIP mode feeds it text.
    config = BridgeVLMConfig(
        vision_config=vision_config("clip"),
        bridge_config=QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        text_config=text_config("opt"),
        image_token_id=IMAGE_ID,
        use_qformer_text_input=instruct,
    )
    assert config.bridge_config.use_text_input is instruct
    assert BridgeVLMConfig.from_dict(config.to_dict()).bridge_config.use_text_input is instruct


def test_old_config_with_an_unused_text_branch_loads_without_it(tmp_path):
    config = vlm_config()
    saved = config.to_dict()
    saved["bridge_config"]["use_text_input"] = True  # as saved before the bridge followed use_qformer_text_input
    saved["use_qformer_text_input"] = False
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert BridgeVLMConfig.from_pretrained(tmp_path).bridge_config.use_text_input is False
