"""Stage-1 captioning through transformers' `generate` (`QFormerCaptioner`): greedy parity with the hand-written loop
it replaced, beam search, sampling, length limits, and the Q-Former's KV cache against full re-runs."""

import pytest
import torch
from tiny import EOS_ID, PAD_ID, VOCAB_SIZE, bridge_config, stage1_config
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlbridge import QFormerForImageTextPretraining
from vlbridge.modeling.compat import CACHE_KEY
from vlbridge.modeling.qformer_captioning import QFormerCaptioner


DEC_ID = VOCAB_SIZE - 1  # stage1_config's decoder_start_token_id (BLIP-2's [DEC])
MAX_NEW = 8

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, sharpen: float = 4.0) -> QFormerForImageTextPretraining:
    """A tiny stage-1 model whose captions depend on the image and are not flat: perturbed away from its init
    (LayerNorms at 1 / 0, heads near 0) and with a sharpened ITG head, standing in for a trained model."""
    torch.manual_seed(seed)
    qformer = bridge_config("qformer", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = QFormerForImageTextPretraining(stage1_config(qformer_config=qformer)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("qformer", "lm_head")):
                param.add_(0.3 * torch.randn_like(param))
        model.lm_head.decoder.weight.mul_(sharpen)
    return model


def make_pixels(batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    size = stage1_config().vision_config.image_size
    return 3 * torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_greedy(model, pixel_values, max_new_tokens):
    """The hand-written greedy loop `generate_captions` had before it used `generate`: the whole prefix through
    `compute_itg_logits` every step, finished rows padded, stop once every row has its EOS."""
    image_embeds = model.get_vision_features(pixel_values)
    ids = torch.full((image_embeds.shape[0], 1), DEC_ID)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_ids = model.compute_itg_logits(image_embeds, ids)[:, -1].argmax(-1).masked_fill(finished, PAD_ID)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        finished |= next_ids == EOS_ID
        if finished.all():
            break
    return ids[:, 1:]


def caption_log_prob(model, image_embeds, caption):
    """Sum of the log-probabilities of one caption (up to and including its EOS) under the ITG head."""
    tokens = caption.tolist()
    tokens = tokens[: tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens
    ids = torch.tensor([[DEC_ID] + tokens])
    log_probs = F.log_softmax(model.compute_itg_logits(image_embeds, ids)[0, :-1], dim=-1)  # (T, V)
    return log_probs.gather(-1, torch.tensor(tokens)[:, None]).sum().item()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def greedy(model):
    with torch.no_grad():
        return reference_greedy(model, make_pixels(), MAX_NEW)


# ---------------------------------------------------------------------------------------------------------------------
# Greedy, EOS and padding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_the_hand_written_loop(model, greedy, use_cache):
    assert len({tuple(row) for row in greedy.tolist()}) > 1, "the images should get different captions"
    out = model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, use_cache=use_cache)
    assert torch.equal(out, greedy)


def test_captioner_shares_modules_and_leaves_the_state_dict_alone(model):
    keys = set(model.state_dict())
    captioner = model.get_captioner()
    assert captioner.qformer is model.qformer and captioner.lm_head is model.lm_head
    assert captioner.config is not model.config and captioner.can_generate()
    assert set(model.state_dict()) == keys


def test_rows_end_at_their_eos_and_are_padded(model, monkeypatch):
    script = {0: [7, EOS_ID], 1: [8, 9, EOS_ID]}  # row 0 ends after 2 tokens, row 1 after 3
    calls = []

    def scripted_forward(self, input_ids=None, image_embeds=None, attention_mask=None, **kwargs):
        calls.append(input_ids.clone())
        step = input_ids.shape[1] - 1
        logits = torch.zeros(2, input_ids.shape[1], VOCAB_SIZE)
        for row, tokens in script.items():
            logits[row, -1, tokens[min(step, len(tokens) - 1)]] = 1.0
        return CausalLMOutputWithPast(logits=logits)

    monkeypatch.setattr(QFormerCaptioner, "forward", scripted_forward)
    out = model.generate_captions(make_pixels(2), max_new_tokens=10, use_cache=False)
    assert out.tolist() == [[7, EOS_ID, PAD_ID], [8, 9, EOS_ID]]  # stops once every row has its EOS
    assert len(calls) == 3 and (calls[0][:, 0] == DEC_ID).all()


def test_min_new_tokens_forbids_eos_before_it():
    model = make_model()
    with torch.no_grad():
        model.lm_head.decoder.bias[EOS_ID] += 100.0  # EOS wins every step unless forbidden
    pixel_values = make_pixels(2)
    assert model.generate_captions(pixel_values, max_new_tokens=MAX_NEW).tolist() == [[EOS_ID], [EOS_ID]]
    out = model.generate_captions(pixel_values, max_new_tokens=MAX_NEW, min_new_tokens=4)
    assert out.shape == (2, 5)  # transformers' count: at least 4 tokens, then the EOS
    assert (out[:, :4] != EOS_ID).all() and (out[:, 4] == EOS_ID).all()


# ---------------------------------------------------------------------------------------------------------------------
# Beam search and sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_beam_search_scores_at_least_greedy(model, greedy):
    pixel_values = make_pixels()
    # length_penalty=0: beams are ranked by their summed log-probability, the quantity compared here.
    beams = model.generate_captions(pixel_values, max_new_tokens=MAX_NEW, num_beams=3, length_penalty=0.0)
    assert beams.shape[0] == 3 and beams.shape[1] <= MAX_NEW
    with torch.no_grad():
        image_embeds = model.get_vision_features(pixel_values)
        for row in range(3):
            image = image_embeds[row : row + 1]
            beam_score = caption_log_prob(model, image, beams[row])
            assert beam_score >= caption_log_prob(model, image, greedy[row]) - 1e-5


def test_beams_follow_their_own_image(model):
    # `image_embeds` is repeated per beam by generate: a batch gives each image the captions it gets alone.
    pixel_values = make_pixels()
    together = model.generate_captions(pixel_values, max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=2)
    assert together.shape[0] == 6
    for row in range(3):
        alone = model.generate_captions(
            pixel_values[row : row + 1], max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=2
        )
        assert torch.equal(together[2 * row : 2 * row + 2, : alone.shape[1]], alone)


def test_sampling_is_seeded_and_departs_from_greedy(model, greedy):
    pixel_values = make_pixels()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate_captions(pixel_values, max_new_tokens=MAX_NEW, do_sample=True, temperature=5.0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][:, : greedy.shape[1]], greedy)


def test_num_return_sequences_with_nucleus_sampling(model):
    torch.manual_seed(0)
    out = model.generate_captions(
        make_pixels(2), max_new_tokens=MAX_NEW, do_sample=True, top_p=0.9, temperature=3.0, num_return_sequences=3
    )
    assert out.shape[0] == 6 and out.shape[1] <= MAX_NEW
    assert len({tuple(row) for row in out.tolist()}) > 2  # sampled, not three copies


def test_tiny_top_p_is_greedy(model, greedy):
    torch.manual_seed(0)
    out = model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, do_sample=True, top_p=1e-6)
    assert torch.equal(out, greedy)


def test_repetition_penalty_is_applied(model, greedy):
    out = model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, repetition_penalty=50.0)
    for row in out.tolist():
        tokens = row[: row.index(EOS_ID)] if EOS_ID in row else row
        assert len(tokens) == len(set(tokens))  # no token twice under a huge penalty


# ---------------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_cached_steps_equal_full_reruns(implementation):
    model = make_model(sharpen=1.0)  # logits of a few units, so that 1e-5 is float32 rounding, not a loose bound
    model.set_attn_implementation(implementation)
    captioner = model.get_captioner()
    ids = torch.cat([torch.full((2, 1), DEC_ID), torch.randint(5, 60, (2, 6))], dim=1)  # (2, 7)
    mask = torch.ones_like(ids)
    mask[1, 3] = 0  # a padded text position is masked for every later step too
    with torch.no_grad():
        image_embeds = model.get_vision_features(make_pixels(2))
        full = model.compute_itg_logits(image_embeds, ids, mask)  # (2, 7, V)
        cache = DynamicCache()
        out = captioner(
            input_ids=ids[:, :3],
            image_embeds=image_embeds,
            attention_mask=mask[:, :3],
            use_cache=True,
            **{CACHE_KEY: cache},
        )
        steps = [out.logits]
        for t in range(3, 7):
            out = captioner(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                use_cache=True,
                **{CACHE_KEY: out[CACHE_KEY]},
            )
            steps.append(out.logits)
    assert cache.get_seq_length() == model.config.qformer_config.num_query_tokens + 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_generate_runs_one_token_per_step_with_the_cache(model):
    calls = []
    hook = model.qformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs["use_queries"])),
        with_kwargs=True,
    )
    try:
        model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, num_beams=2, use_cache=True)
        cached, calls[:] = list(calls), []
        model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, num_beams=2, use_cache=False)
    finally:
        hook.remove()
    # Cached: the queries run once, then one new token per step. Uncached: queries and the whole prefix each step.
    assert cached == [(1, True)] + [(1, False)] * (len(cached) - 1) and len(cached) > 2
    assert calls == [(length, True) for length in range(1, len(calls) + 1)]


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(do_sample=True, top_p=0.9, num_return_sequences=2)])
def test_cache_and_no_cache_give_the_same_tokens(model, options):
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outputs.append(model.generate_captions(make_pixels(), max_new_tokens=MAX_NEW, use_cache=use_cache, **options))
    assert torch.equal(*outputs)


def test_qformer_refuses_a_cache_it_cannot_use(model):
    image_embeds = model.get_vision_features(make_pixels(1))
    dec = torch.tensor([[DEC_ID]])
    with pytest.raises(ValueError, match="multimodal_causal"):  # queries that read the text would go stale
        model.qformer(image_embeds=image_embeds, input_ids=dec, **{CACHE_KEY: DynamicCache()})
    queries = torch.randn(1, 2, model.config.qformer_config.hidden_size)
    with pytest.raises(ValueError, match="num_query_tokens"):
        model.qformer(
            image_embeds=image_embeds,
            input_ids=dec,
            query_embeds=queries,
            attention_mode="multimodal_causal",
            **{CACHE_KEY: DynamicCache()},
        )
    cache = DynamicCache()
    model.qformer(image_embeds=image_embeds, input_ids=dec, attention_mode="multimodal_causal", **{CACHE_KEY: cache})
    with pytest.raises(ValueError, match="use_queries=False"):
        model.qformer(
            image_embeds=image_embeds, input_ids=dec, attention_mode="multimodal_causal", **{CACHE_KEY: cache}
        )
