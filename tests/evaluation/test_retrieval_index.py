"""
Tests of `vlbridge.evaluation.retrieval_index`: the chunked on-disk search equals the exact top-k of the full
similarity matrix, the index reopens from disk, the ITM re-ranked result equals the in-memory retriever's, the
index is read one shard at a time whatever the number of queries, and `vlbridge retrieve --index` builds and reuses it.
"""

import json
import re

import pytest
import torch
from helpers import run_docstring_examples
from tiny import make_images, make_tokenizer, stage1_config
from transformers import CLIPImageProcessor

import vlbridge.evaluation.retrieval_index as retrieval_index
from vlbridge import BridgeProcessor, QFormerForImageTextPretraining
from vlbridge.cli import main
from vlbridge.evaluation.retrieval import ImageTextRetriever, retrieve
from vlbridge.evaluation.retrieval_index import EmbeddingIndex, merge_topk
from vlbridge.modeling.stage1_losses import query_text_similarity


pytestmark = pytest.mark.usefixtures("single_thread")

NUM_IMAGES, NUM_QUERIES, DIM = 103, 4, 16  # 103 is prime: no chunk or shard size below it divides it


def random_features(seed: int = 0, num_images: int = NUM_IMAGES, num_texts: int = 11):
    generator = torch.Generator().manual_seed(seed)
    image_feats = torch.nn.functional.normalize(torch.randn(num_images, NUM_QUERIES, DIM, generator=generator), dim=-1)
    text_feats = torch.nn.functional.normalize(torch.randn(num_texts, DIM, generator=generator), dim=-1)
    return image_feats, text_feats  # (N, Q, E), (M, E)


def write_index(path, image_feats, shard_size: int, batch: int = 10, **kwargs) -> EmbeddingIndex:
    batches = [image_feats[start : start + batch] for start in range(0, len(image_feats), batch)]
    return EmbeddingIndex.write(path, batches, shard_size=shard_size, **kwargs)


@pytest.mark.parametrize("shard_size", [25, 40, 103, 500])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_chunked_search_equals_the_exact_top_k(tmp_path, shard_size, chunk_size):
    image_feats, text_feats = random_features()
    index = write_index(tmp_path, image_feats, shard_size)
    assert len(index) == NUM_IMAGES and sum(shard["count"] for shard in index.shards) == NUM_IMAGES
    assert len(index.shards) == -(-NUM_IMAGES // shard_size)

    similarity = query_text_similarity(image_feats, text_feats)  # (N, M), the in-memory retriever's ITC
    k = 9
    scores, indices = index.search(text_feats, k, chunk_size=chunk_size, query_batch_size=4)
    expected = similarity.t().topk(k, dim=1)  # each text's images
    assert indices.shape == (len(text_feats), k)
    assert torch.equal(indices, expected.indices)  # random features: no ties
    torch.testing.assert_close(scores, expected.values, atol=1e-6, rtol=1e-6)

    scores, indices = index.search_texts(text_feats, 5, chunk_size=chunk_size, text_batch_size=3)
    expected = similarity.topk(5, dim=1)  # each image's texts
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values, atol=1e-6, rtol=1e-6)


def test_k_is_clipped_and_merge_keeps_the_best(tmp_path):
    image_feats, text_feats = random_features(num_images=6)
    index = write_index(tmp_path, image_feats, shard_size=4)
    scores, indices = index.search(text_feats, k=50)
    assert indices.shape == (len(text_feats), 6)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(6).expand(len(text_feats), 6))
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first

    running = (torch.tensor([[0.9, 0.1]]), torch.tensor([[4, 2]]))
    top_scores, top_indices = merge_topk(*running, torch.tensor([[0.5, 0.95, 0.0]]), offset=10, k=3)
    assert top_indices.tolist() == [[11, 4, 10]] and top_scores[0].tolist() == pytest.approx([0.95, 0.9, 0.5])


def test_the_index_reopens_from_disk_with_the_same_results(tmp_path):
    image_feats, text_feats = random_features(seed=1)
    written = write_index(tmp_path / "index", image_feats, shard_size=30)
    first = written.search(text_feats, k=7, chunk_size=11)
    del written
    reopened = EmbeddingIndex.open(tmp_path / "index")
    second = reopened.search(text_feats, k=7, chunk_size=11)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    assert (reopened.num_queries, reopened.embed_dim, reopened.sources) == (NUM_QUERIES, DIM, None)
    assert torch.equal(reopened.load_all(), image_feats)
    rows = torch.tensor([102, 0, 31, 29, 30])  # across shard boundaries, out of order
    assert torch.equal(reopened.image_features(rows), image_feats[rows])

    # float16 storage halves the disk; the search computes in float32 and finds the same images.
    half = write_index(tmp_path / "half", image_feats, shard_size=30, dtype=torch.float16)
    assert json.loads((tmp_path / "half" / "index.json").read_text())["dtype"] == "torch.float16"
    scores, indices = half.search(text_feats, k=3)
    expected = query_text_similarity(image_feats.half().float(), text_feats).t().topk(3, dim=1)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=1e-5)

    with pytest.raises(FileNotFoundError, match="not an embedding index"):
        EmbeddingIndex.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="query_features must be"):
        reopened.search(torch.randn(2, DIM + 1), k=3)


def test_search_reads_the_index_one_shard_at_a_time_whatever_the_number_of_queries(tmp_path, monkeypatch):
    image_feats, _ = random_features()
    index = write_index(tmp_path, image_feats, shard_size=25)
    # Opening reads the metadata only: the object holds no embeddings.
    assert not any(torch.is_tensor(value) for value in vars(index).values())

    opened, open_now, most_open = [], [0], [0]
    real_safe_open = retrieval_index.safe_open

    class CountingSafeOpen:
        def __init__(self, file, *args, **kwargs):
            self.handle = real_safe_open(file, *args, **kwargs)
            opened.append(file)

        def __enter__(self):
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])
            return self.handle.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.handle.__exit__(*exc)

    shapes = []
    real_similarity = retrieval_index.chunk_similarity

    def recording_similarity(chunk, queries):
        shapes.append((tuple(chunk.shape), len(queries)))
        return real_similarity(chunk, queries)

    monkeypatch.setattr(retrieval_index, "safe_open", CountingSafeOpen)
    monkeypatch.setattr(retrieval_index, "chunk_similarity", recording_similarity)
    for num_texts in (3, 300):
        opened.clear(), shapes.clear()
        queries = torch.nn.functional.normalize(torch.randn(num_texts, DIM), dim=-1)
        scores, indices = index.search(queries, k=5, chunk_size=10, query_batch_size=16)
        assert indices.shape == (num_texts, 5)
        # One pass over the shards, each mapped alone, for 3 queries as for 300: the index is never loaded whole.
        assert len(opened) == len(index.shards) and most_open[0] == 1
        # Every step is one chunk of at most 10 images against at most 16 queries: memory does not grow with them.
        assert max(chunk[0] for chunk, _ in shapes) <= 10 and max(batch for _, batch in shapes) <= 16
        assert sum(chunk[0] for chunk, _ in shapes) == NUM_IMAGES * -(-num_texts // 16)


# ---------------------------------------------------------------------------------------------------------------------
# ITM re-ranking with a tiny stage-1 model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return QFormerForImageTextPretraining(stage1_config()).eval()


def tiny_texts(num_texts: int = 9):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 60, (num_texts, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -2:] = 0  # padding goes through both paths the same way
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("store_vision_features", [False, True])
def test_index_path_equals_the_in_memory_retriever(tiny_model, tmp_path, store_vision_features):
    pixel_values = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts, text_to_image = tiny_texts(), [0, 1, 2, 3, 4, 5, 6, 0, 1]
    retriever = ImageTextRetriever(tiny_model, k_test=5, batch_size=4, ks=(1, 5), progress=False)
    expected = retriever.retrieve(pixel_values, texts, text_to_image)

    index = retriever.build_index(pixel_values, tmp_path, shard_size=3, store_vision_features=store_vision_features)
    assert index.has_vision_features == store_vision_features
    images = None if store_vision_features else pixel_values  # in-memory images: recomputed for the candidates
    out = retriever.retrieve_from_index(index, texts, text_to_image, images=images, chunk_size=2)
    scores_i2t, scores_t2i = out.to_dense()
    torch.testing.assert_close(scores_i2t, expected.scores_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores_t2i, expected.scores_t2i, atol=1e-5, rtol=1e-5)
    assert (out.t2i_scores[:, :-1] >= out.t2i_scores[:, 1:]).all()  # re-ranked lists, best first
    assert out.metrics == pytest.approx(expected.metrics)  # k_test >= max(ks): the same recall

    text_only = retriever.retrieve_from_index(index, texts, images=images, image_to_text=False)
    assert text_only.i2t_scores is None and torch.equal(text_only.t2i_indices, out.t2i_indices)
    if not store_vision_features:
        with pytest.raises(ValueError, match="needs the gallery's images"):
            retriever.retrieve_from_index(index, texts)


def test_index_built_from_image_paths_recomputes_vision_features_from_them(tiny_model, tmp_path):
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    paths = []
    for number, image in enumerate(make_images(5, seed=4)):
        paths.append(str(tmp_path / f"image{number}.png"))
        image.save(paths[-1])
    captions = ["a red circle", "two blue stars", "a green square", "the yellow star", "a circle", "one square"]
    options = dict(tokenizer=make_tokenizer(), image_processor=image_processor, k_test=4, ks=(1, 3), progress=False)
    text_to_image = [0, 1, 2, 3, 4, 0]
    expected = retrieve(tiny_model, make_images(5, seed=4), captions, text_to_image, **options)
    out = retrieve(tiny_model, paths, captions, text_to_image, index=tmp_path / "index", **options)
    assert EmbeddingIndex.open(tmp_path / "index").sources == paths
    scores_i2t, scores_t2i = out.to_dense()
    torch.testing.assert_close(scores_i2t, expected.scores_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores_t2i, expected.scores_t2i, atol=1e-5, rtol=1e-5)
    assert out.metrics == pytest.approx(expected.metrics)
    # The second call reuses the index on disk (and its paths) without the images.
    again = retrieve(tiny_model, None, captions, text_to_image, index=tmp_path / "index", **options)
    assert torch.equal(again.t2i_indices, out.t2i_indices)


def test_docstring_examples():
    run_docstring_examples("vlbridge.evaluation.retrieval_index")
    run_docstring_examples("vlbridge.evaluation.retrieval")


# ---------------------------------------------------------------------------------------------------------------------
# vlbridge retrieve --index
# ---------------------------------------------------------------------------------------------------------------------


def ranked_lines(out: str, heading: str) -> list[str]:
    section = out.split(heading, 1)[1].split(" -> ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("  '")]


def test_cli_retrieve_builds_and_reuses_an_index(tiny_model, tmp_path, capsys):
    checkpoint = tmp_path / "stage1"
    tiny_model.save_pretrained(checkpoint)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    num_queries = tiny_model.config.qformer_config.num_query_tokens
    BridgeProcessor(image_processor, make_tokenizer(), num_image_tokens=num_queries).save_pretrained(checkpoint)
    paths = []
    for number, image in enumerate(make_images(4, seed=5)):
        paths.append(str(tmp_path / f"scene{number}.png"))
        image.save(paths[-1])
    argv = ["retrieve", str(checkpoint), "--images", *paths, "--texts", "a red circle", "two stars", "--top_k", "3"]

    assert main(argv) == 0
    in_memory = capsys.readouterr().out
    index_dir = tmp_path / "gallery_index"
    assert main([*argv, "--index", str(index_dir), "--batch_size", "3"]) == 0
    indexed = capsys.readouterr().out
    assert EmbeddingIndex.exists(index_dir) and "image -> texts" not in indexed
    # The same ranked images and scores as the in-memory path.
    assert ranked_lines(indexed, "text -> images") == ranked_lines(in_memory, "text -> images")
    assert len(ranked_lines(indexed, "text -> images")) == 2

    shards = {path: path.stat().st_mtime_ns for path in index_dir.glob("*.safetensors")}
    assert main([*argv, "--index", str(index_dir)]) == 0  # reused, not rebuilt
    assert capsys.readouterr().out == indexed
    assert {path: path.stat().st_mtime_ns for path in index_dir.glob("*.safetensors")} == shards

    assert main([*argv[:3], *paths[:2], *argv[-5:], "--index", str(index_dir)]) == 2  # other images
    assert re.search(r"vlbridge retrieve: error: .*other images", capsys.readouterr().err)
