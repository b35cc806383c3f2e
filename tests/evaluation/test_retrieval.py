"""Tests of `vlbridge.evaluation.retrieval`: ITC scoring, ITM re-ranking of the top-k, Recall@K in both directions."""

import pytest
import torch
from tiny import make_images, make_tokenizer, stage1_config
from transformers import CLIPImageProcessor

from vlbridge import QFormerForImageTextPretraining
from vlbridge.evaluation.retrieval import NOT_RERANKED, ImageTextRetriever, retrieval_metrics, retrieve
from vlbridge.metrics.retrieval_recall import recall_at_k


pytestmark = pytest.mark.usefixtures("single_thread")


class KnownScoresModel:
    """
    Stands in for the stage-1 model with scores chosen by hand: "pixel values" and "input ids" carry the image / text
    index, the embeddings come from tables, and the ITM match logit of (image i, text t) is `itm[i, t]`.
    """

    def __init__(self, image_feats: torch.Tensor, text_feats: torch.Tensor, itm: torch.Tensor):
        self.image_feats, self.text_feats, self.itm = image_feats, text_feats, itm
        self.itm_pairs = []
        self.training = False

    def get_vision_features(self, pixel_values):
        return pixel_values.view(-1, 1, 1)  # (b, P=1, Dv=1): the image index

    def get_image_features(self, pixel_values=None, image_embeds=None):
        return self.image_feats[image_embeds.view(-1).long()]

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_feats[input_ids[:, 0]]

    def compute_itm_logits(self, image_embeds, input_ids, attention_mask=None):
        images, texts = image_embeds.view(-1).long(), input_ids[:, 0]
        self.itm_pairs += list(zip(images.tolist(), texts.tolist()))
        match = self.itm[images, texts]
        return torch.stack([-match, match], dim=-1)


def known_inputs(num_images: int, num_texts: int):
    pixel_values = torch.arange(num_images, dtype=torch.float)
    texts = {
        "input_ids": torch.arange(num_texts)[:, None],
        "attention_mask": torch.ones(num_texts, 1, dtype=torch.long),
    }
    return pixel_values, texts


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float), dim=-1)


def test_scores_and_recall_match_a_hand_computation():
    # 2 images x 2 queries and 3 texts, in 2-D. Best-query cosines (image 0's second query is [0.6, 0.8]):
    #   image 0: text 0 -> 1.0, text 1 -> 0.8, text 2 -> max(0.8, 0.96) = 0.96
    #   image 1: text 0 -> 0.0, text 1 -> 1.0, text 2 -> 0.6
    image_feats = torch.stack([unit([1, 0], [0.6, 0.8]), unit([0, 1], [0, 1])])  # (2, 2, 2)
    text_feats = unit([1, 0], [0, 1], [0.8, 0.6])
    itm = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])  # ITM (wrongly) prefers text 2 for image 0
    model = KnownScoresModel(image_feats, text_feats, itm)
    pixel_values, texts = known_inputs(2, 3)
    out = retrieve(model, pixel_values, texts, text_to_image=[0, 1, 1], k_test=128, ks=(1, 2), progress=False)

    similarity = torch.tensor([[1.0, 0.8, 0.96], [0.0, 1.0, 0.6]])
    torch.testing.assert_close(out.similarity, similarity)
    torch.testing.assert_close(out.scores_i2t, similarity + itm)  # k_test >= 3: every pair re-ranked
    torch.testing.assert_close(out.scores_t2i, (similarity + itm).t())
    # i2t (image 0 owns text 0, image 1 texts 1, 2): image 0 ranks text 2 (5.96) before its text 0 -> miss at 1,
    # hit at 2; image 1 ranks text 1 first -> hit. t2i: text 0 -> image 0, hit; text 1 -> image 1, hit; text 2 ranks
    # image 0 (5.96) before its image 1 -> miss at 1, hit at 2.
    assert out.metrics == pytest.approx(
        {"i2t_r1": 0.5, "i2t_r2": 1.0, "t2i_r1": 2 / 3, "t2i_r2": 1.0, "r_mean": (0.5 + 1.0 + 2 / 3 + 1.0) / 4}
    )


def test_rerank_touches_only_each_rows_top_k():
    torch.manual_seed(0)
    num_images, num_texts, k = 4, 7, 2
    image_feats = torch.nn.functional.normalize(torch.randn(num_images, 3, 8), dim=-1)
    text_feats = torch.nn.functional.normalize(torch.randn(num_texts, 8), dim=-1)
    itm = torch.randn(num_images, num_texts)
    model = KnownScoresModel(image_feats, text_feats, itm)
    retriever = ImageTextRetriever(model, k_test=k, batch_size=3, progress=False)
    out = retriever.retrieve(*known_inputs(num_images, num_texts))

    top_texts = out.similarity.topk(k, dim=1).indices
    for image in range(num_images):
        reranked = (out.scores_i2t[image] != NOT_RERANKED).nonzero().flatten()
        assert sorted(reranked.tolist()) == sorted(top_texts[image].tolist())
        for text in reranked:
            assert out.scores_i2t[image, text] == pytest.approx(float(itm[image, text] + out.similarity[image, text]))
    top_images = out.similarity.t().topk(k, dim=1).indices
    for text in range(num_texts):
        reranked = (out.scores_t2i[text] != NOT_RERANKED).nonzero().flatten()
        assert sorted(reranked.tolist()) == sorted(top_images[text].tolist())
    # ITM ran on exactly the top-k pairs of both directions, in chunks of batch_size.
    expected_pairs = [(i, int(t)) for i in range(num_images) for t in top_texts[i]]
    expected_pairs += [(int(i), t) for t in range(num_texts) for i in top_images[t]]
    assert sorted(model.itm_pairs) == sorted(expected_pairs)


def test_k_larger_than_the_candidates_reranks_everything():
    torch.manual_seed(1)
    model = KnownScoresModel(
        torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1),
        torch.nn.functional.normalize(torch.randn(5, 4), dim=-1),
        torch.randn(3, 5),
    )
    out = retrieve(model, *known_inputs(3, 5), text_to_image=[0, 0, 1, 2, 2], k_test=128, progress=False)
    assert (out.scores_i2t != NOT_RERANKED).all() and (out.scores_t2i != NOT_RERANKED).all()
    torch.testing.assert_close(out.scores_i2t, out.similarity + model.itm)
    assert len(model.itm_pairs) == 2 * 3 * 5


def test_retrieval_metrics_several_captions_per_image():
    scores_i2t = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.8, 0.1, 0.7, 0.2]])  # image 0 owns texts 0, 1; image 1: 2, 3
    scores_t2i = torch.tensor([[0.2, 0.9], [0.9, 0.1], [0.1, 0.8], [0.6, 0.5]])
    metrics = retrieval_metrics(scores_i2t, scores_t2i, text_to_image=[0, 0, 1, 1], ks=(1, 2))
    # image 0: text 1 first (its own) -> hit; image 1: text 0 first, text 2 second -> miss at 1, hit at 2.
    # texts: 0 -> image 1 (miss), 1 -> image 0 (hit), 2 -> image 1 (hit), 3 -> image 0 (miss); all hit at 2.
    assert metrics == pytest.approx({"i2t_r1": 0.5, "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0, "r_mean": 0.75})
    assert recall_at_k(scores_i2t, [[0, 1], [2, 3]], ks=(1,)) == {"r1": 0.5}
    with pytest.raises(ValueError, match="no relevant candidate"):
        retrieval_metrics(scores_i2t, scores_t2i, text_to_image=[0, 0, 0, 0])  # image 1 has no caption


def tiny_stage1_model() -> QFormerForImageTextPretraining:
    torch.manual_seed(0)
    return QFormerForImageTextPretraining(stage1_config()).train()


def test_end_to_end_with_a_tiny_model_from_images_and_strings():
    model = tiny_stage1_model()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    captions = ["a red circle", "a red square", "two blue stars", "a green triangle", "the yellow star", "a circle"]
    out = retrieve(
        model,
        make_images(3),
        captions,
        text_to_image=[0, 0, 1, 1, 2, 2],
        tokenizer=make_tokenizer(),
        image_processor=image_processor,
        batch_size=2,
        k_test=4,
        progress=False,
    )
    assert out.scores_i2t.shape == (3, 6) and out.scores_t2i.shape == (6, 3)
    assert set(out.metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    assert all(0.0 <= value <= 1.0 for value in out.metrics.values())
    assert out.metrics["t2i_r5"] == 1.0  # only 3 images
    assert model.training  # restored after retrieval, which ran in eval mode
    assert (out.similarity.abs() <= 1.0 + 1e-5).all()  # cosines, no temperature


def test_retriever_matches_the_model_scores():
    model = tiny_stage1_model().eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    input_ids = torch.randint(5, 60, (4, 5))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -2:] = 0
    texts = {"input_ids": input_ids, "attention_mask": attention_mask}
    out = ImageTextRetriever(model, k_test=2, batch_size=2, progress=False).retrieve(pixel_values, texts)
    assert out.metrics is None
    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values)
        text_feats = model.get_text_features(input_ids, attention_mask)
        expected = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1)
        torch.testing.assert_close(out.similarity, expected, atol=1e-5, rtol=1e-5)
        image, text = 1, int(out.similarity[1].argmax())
        itm = model.compute_itm_logits(
            model.get_vision_features(pixel_values[image : image + 1]),
            input_ids[text : text + 1],
            attention_mask[text : text + 1],
        )[0, 1]
    torch.testing.assert_close(out.scores_i2t[image, text], itm + expected[image, text], atol=1e-5, rtol=1e-5)


def test_inputs_that_need_a_processor_raise_clearly():
    model = tiny_stage1_model()
    with pytest.raises(ValueError, match="image_processor"):
        retrieve(model, make_images(2), ["a", "b"], tokenizer=make_tokenizer(), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        retrieve(model, torch.randn(2, 3, 32, 32), ["a", "b"], progress=False)
