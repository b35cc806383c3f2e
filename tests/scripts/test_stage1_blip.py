"""`vlbridge stage1 --model_type blip`: BLIP's MED model trained by the stage-1 script and trainer, saved, and loaded
back by the commands that take stage-1 folders; the Q-Former path unchanged."""

import json

import pytest
from transformers import AutoModel

from vlbridge import BlipMEDForImageTextPretraining, QFormerForImageTextPretraining
from vlbridge.scripts.inference import evaluate_checkpoint, load_checkpoint, rank_matches
from vlbridge.scripts.stage1 import ModelArguments, build_tokenizer, load_stage1_folder, main, make_parser


pytestmark = pytest.mark.usefixtures("single_thread")

TINY = [
    "--max_steps", "2",
    "--num_train_images", "32",
    "--num_eval_images", "8",
    "--vision_layers", "1",
    "--vision_hidden_size", "32",
    "--text_hidden_size", "32",
    "--text_layers", "1",
    "--per_device_train_batch_size", "8",
    "--k_test", "4",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def blip_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("blip") / "out"
    argv = ["--config", "stage1_blip_builtin", "--output_dir", str(output), *TINY]
    return main(*make_parser().parse_args_and_config(argv)), output


def test_the_preset_trains_blip_with_the_stage1_trainer(blip_run):
    result, output = blip_run
    assert {"i2t_r1", "t2i_r1", "itm_accuracy", "itg_exact"} <= set(result.metrics)
    logged = next(entry for entry in result.log_history if "loss" in entry)
    assert {"loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temperature"} <= set(logged)
    model = AutoModel.from_pretrained(output)
    assert isinstance(model, BlipMEDForImageTextPretraining)
    config = model.config
    assert config.text_config.hidden_size == 32 and config.text_config.num_hidden_layers == 1
    assert config.share_encoder_decoder and config.use_momentum_distillation and config.queue_size % 8 == 0
    _, tokenizer, _ = load_stage1_folder(str(output))
    assert config.decoder_start_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert config.enc_token_id == tokenizer.convert_tokens_to_ids("[ENC]") != tokenizer.unk_token_id
    card = (output / "README.md").read_text()
    assert "**Training stage:** `stage1`" in card and "BLIP multimodal mixture of encoder-decoder" in card


def test_blip_folders_are_stage1_checkpoints_for_the_commands(blip_run, tmp_path):
    _, output = blip_run
    checkpoint = load_checkpoint(output)
    assert checkpoint.kind == "stage1" and isinstance(checkpoint.model, BlipMEDForImageTextPretraining)
    from vlbridge.scripts.inference import held_out_images

    images = held_out_images(3, checkpoint.image_size)
    scores_i2t, scores_t2i = rank_matches(checkpoint, list(images["image"]), [row[0] for row in images["captions"]])
    assert scores_i2t.shape == (3, 3) and scores_t2i.shape == (3, 3)
    assert {"i2t_r1", "itm_accuracy", "itg_exact"} <= set(
        evaluate_checkpoint(checkpoint, num_images=4, progress=False)
    )

    # A BLIP MED folder holding another head (the VQA model) is no stage-1 checkpoint: refused, naming what it holds.
    import shutil

    other = tmp_path / "vqa"
    shutil.copytree(output, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["BlipMEDForQuestionAnswering"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="BlipMEDForQuestionAnswering"):
        load_checkpoint(other)
    with pytest.raises(ValueError, match="not a stage-1 model"):
        load_stage1_folder(str(other))


def test_stage1_continues_from_a_blip_folder(blip_run, tmp_path):
    _, output = blip_run
    argv = ["--config", "stage1_blip_builtin", "--model_name_or_path", str(output), "--output_dir", str(tmp_path)]
    result = main(*make_parser().parse_args_and_config([*argv, *TINY]))
    assert "itm_accuracy" in result.metrics
    assert isinstance(AutoModel.from_pretrained(tmp_path), BlipMEDForImageTextPretraining)


def test_model_type_is_checked_and_the_qformer_path_is_unchanged():
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'blip2' (choose from 'qformer', 'blip')"
        make_parser().parse_args_and_config(["--model_type", "blip2"])
    with pytest.raises(ValueError, match="--model_type must be one of"):
        ModelArguments(model_type="blip2")
    _, _, model_args = make_parser().parse_args_and_config(["--config", "stage1_builtin"])
    assert model_args.model_type == "qformer" and model_args.momentum_options() == {}
    # The Q-Former's tokenizer keeps its vocabulary (so its preset's figures do not move): only BLIP adds [ENC].
    words = ["a", "red", "circle"]
    from vlbridge.data import build_word_tokenizer

    assert build_tokenizer(words).get_vocab() == build_word_tokenizer([*words, "[DEC]"]).get_vocab()
    assert "[ENC]" not in build_tokenizer(words).get_vocab() and "[ENC]" in build_tokenizer(words, "blip").get_vocab()


def test_qformer_folders_still_load_for_stage1(tmp_path):
    from helpers import save_tiny_stage1

    save_tiny_stage1(tmp_path)
    model, _, _ = load_stage1_folder(str(tmp_path))
    assert isinstance(model, QFormerForImageTextPretraining)
