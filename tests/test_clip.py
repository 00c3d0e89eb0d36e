"""models/clip: retrieval math on hand-made embeddings, the tokenizer, the batch schedule, and that
training a tiny CLIP is deterministic and learns."""


import numpy as np
import pytest
import torch

from tldr_tasks.models import clip

torch.set_num_threads(1)


def _unit(rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def test_perfect_embedding_scores_100_and_shuffled_scores_less():
    emb = torch.eye(20)
    perfect = clip.retrieval_metrics(emb, emb)
    assert all(perfect[k] == 100.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1"))
    shuffled = clip.retrieval_metrics(emb, emb[torch.randperm(20, generator=torch.Generator().manual_seed(0))])
    assert shuffled["mean_r1"] < 100.0
    # one-hot texts: an image retrieves exactly one text with positive similarity, so R@1 counts the fixed points
    perm = torch.tensor([1, 0] + list(range(2, 20)))
    swapped = clip.retrieval_metrics(emb, emb[perm])
    assert swapped["i2t_r1"] == swapped["t2i_r1"] == 90.0


def test_scene_level_hits_count_any_item_of_the_same_scene():
    # items 0 and 1 show the same scene; their texts are swapped
    images = torch.eye(3)
    texts = images[[1, 0, 2]]
    instance = clip.retrieval_metrics(images, texts)
    assert instance["i2t_r1"] == pytest.approx(100 / 3)
    scene = clip.retrieval_metrics(images, texts, image_groups=["a", "a", "b"], text_groups=["a", "a", "b"])
    assert scene["i2t_r1"] == scene["t2i_r1"] == 100.0


def test_directions_are_scored_separately():
    texts = torch.eye(3)
    # image 1 sits closer to text 0 than to its own text 1: i2t misses it, but text 1's nearest image is still 1
    images = _unit([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]])
    m = clip.retrieval_metrics(images, texts)
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert m["t2i_r1"] == 100.0
    assert m["i2t_r5"] == 100.0  # k beyond the pool size counts every candidate
    assert m["mean_r1"] == pytest.approx((200 / 3 + 100) / 2)


def test_retrieval_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="paired"):
        clip.retrieval_metrics(torch.eye(3), torch.eye(4)[:, :3])


def test_zero_shot_accuracy_and_prompt_ensembling():
    image = _unit([[1, 0], [0, 1], [1, 0.1], [0.1, 1]])
    classes = _unit([[1, 0], [0, 1]])
    assert clip.zero_shot_accuracy(image, classes, [0, 1, 0, 0]) == 75.0
    # scored by an attribute of the classes: the miss (class 1 for class 0) is right when both are red
    assert clip.zero_shot_accuracy(image, classes, [0, 1, 0, 0], class_values=["red", "red"]) == 100.0
    assert clip.zero_shot_accuracy(image, classes, [0, 1, 0, 0], class_values=["red", "blue"]) == 75.0


def test_tokenizer_wraps_in_bos_eos_and_maps_unknown_words():
    tok = clip.CaptionTokenizer.train(["a red circle", "a blue square on grey"], max_tokens=8)
    ids, mask = tok(["A red circle", "purple thing", "", "a a a a a a a a a a a a"])
    assert clip.EOS_ID != 2  # transformers' CLIP would fall back to argmax pooling
    assert ids[0, 0] == clip.BOS_ID and ids[0, 4] == clip.EOS_ID and mask[0].tolist() == [1] * 5 + [0] * 3
    assert ids[1, 1:3].tolist() == [clip.UNK_ID, clip.UNK_ID]
    assert ids[2, :2].tolist() == [clip.BOS_ID, clip.EOS_ID]
    assert ids.shape[1] == 8 and ids[3, -1] == clip.EOS_ID  # truncated, EOS kept
    again = clip.CaptionTokenizer.from_json(tok.to_json(), max_tokens=8)
    assert torch.equal(again(["a blue square"])[0], tok(["a blue square"])[0])


def test_build_clip_presets_and_eos_guard():
    model = clip.build_clip("micro", vocab_size=50)
    assert model.config.vision_config.image_size == 32
    assert model.config.text_config.eos_token_id == clip.EOS_ID
    with pytest.raises(ValueError, match="eos_token_id 2"):
        clip.build_clip("micro", vocab_size=50, eos_token_id=2)
    with pytest.raises(ValueError, match=r"evaluate.preset='huge' is not known \(use one of .*tiny"):
        clip.load_preset("huge")
    assert clip.load_preset("tiny")["image_size"] == 64 and clip.load_preset("tiny")["vision_layers"] == 4


def test_batch_schedule_covers_each_epoch_once_without_duplicates():
    batches = list(clip.batch_schedule(n=50, batch_size=16, steps=10, seed=3))
    assert len(batches) == 10
    per_epoch = clip.epoch_batches(50, 16)
    assert per_epoch == 4
    for epoch in range(2):
        chunk = batches[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert sorted(np.concatenate(chunk).tolist()) == list(range(50))
        assert all(len(set(b.tolist())) == len(b) <= 16 for b in chunk)
    assert [b.tolist() for b in clip.batch_schedule(50, 16, 10, 3)] == [b.tolist() for b in batches]


def _toy(n=48, size=32):
    """Four solid-colour classes with one caption each: learnable in a few dozen steps."""
    colours = {"red": (220, 30, 30), "green": (30, 175, 45), "blue": (35, 70, 235), "yellow": (245, 225, 35)}
    names = list(colours)
    rng = np.random.default_rng(0)
    labels = [i % 4 for i in range(n)]
    images = np.stack([np.clip(np.full((size, size, 3), colours[names[c]]) + rng.integers(-10, 11, (size, size, 3)),
                               0, 255).astype(np.uint8) for c in labels])
    captions = [f"a {names[c]} picture" for c in labels]
    return images, captions, labels


def test_train_clip_is_deterministic_counts_steps_and_learns():
    images, captions, labels = _toy()
    tok = clip.CaptionTokenizer.train(captions)
    curve = []

    def on_checkpoint(step, model):
        assert not model.training  # scored in eval mode, then training resumes
        curve.append((step, clip.retrieval_metrics(clip.embed_images(model, images),
                                                   clip.embed_texts(model, tok, captions), labels, labels)["mean_r1"]))

    model, seconds = clip.train_clip(images, captions, tok, steps=40, batch_size=16, lr=2e-3, seed=1, preset="micro",
                                     checkpoints=[5, 20], on_checkpoint=on_checkpoint)
    assert seconds > 0 and not model.training
    img = clip.embed_images(model, images)
    txt = clip.embed_texts(model, tok, captions)
    learned = clip.retrieval_metrics(img, txt, labels, labels)
    assert learned["mean_r1"] > 90.0  # chance is 25%
    assert [step for step, _ in curve] == [5, 20] and curve[0][1] < learned["mean_r1"]
    names = [["a red picture"], ["a green picture"], ["a blue picture"], ["a yellow picture"]]
    assert clip.zero_shot_accuracy(img, clip.class_embeddings(model, tok, names), labels) > 90.0
    # scoring along the way changes nothing: the same weights as a run without checkpoints
    again, _ = clip.train_clip(images, captions, tok, steps=40, batch_size=16, lr=2e-3, seed=1, preset="micro")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_train_clip_rejects_wrong_images_and_captions():
    tok = clip.CaptionTokenizer.train(["x"])
    with pytest.raises(ValueError, match="uint8"):
        clip.train_clip(np.zeros((4, 32, 32, 3), np.float32), ["x"] * 4, tok, steps=1, preset="micro")
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        clip.train_clip(np.zeros((4, 32, 32, 3), np.uint8), ["x"] * 3, tok, steps=1, preset="micro")


def test_thread_count_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert clip.available_cpus() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert clip.available_cpus() >= 1


def test_a_saved_clip_scores_pairs_for_the_clip_score_selection(tmp_path):
    """save_clip/load_clip round-trip the weights and tokenizer; scoring.pair_scores ranks a shard's pairs
    with the folder and gives identical image bytes one digest."""
    import io

    from PIL import Image

    from tldr_tasks.config import Config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.data.shards import write_tar
    from tldr_tasks.scoring import pair_scores

    tok = clip.CaptionTokenizer.train(["a red circle", "a blue square"])
    model = clip.build_clip("micro", tok.vocab_size)
    clip.save_clip(model, tok, "micro", str(tmp_path / "clip"))
    loaded, loaded_tok, size = clip.load_clip(str(tmp_path / "clip"))
    assert size == 32 and loaded_tok.to_json() == tok.to_json()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    samples = []
    for i in range(5):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200 if i % 2 else 20, 30, 30)).save(buffer, "PNG")
        samples.append((f"k{i}", {"png": buffer.getvalue(), "txt": b"a red circle" if i < 4 else b""}))
    write_tar(str(tmp_path / "00000.tar"), samples)
    cfg = Config()
    cfg.sample.clip_model = str(tmp_path / "clip")
    keys = np.array([f"k{i}" for i in (4, 0, 1, 2, 3)])
    score, digest = pair_scores(cfg, StageIO(input=str(tmp_path / "00000.tar"), out=str(tmp_path / "run")), keys)
    images = clip.embed_images(loaded, np.stack([np.full((32, 32, 3), (20, 30, 30), np.uint8)]))
    text = clip.embed_texts(loaded, loaded_tok, ["a red circle"])
    assert np.isnan(score[0])  # the empty caption
    assert score[1] == pytest.approx(float((images @ text.T)[0, 0]), abs=1e-5)
    assert digest[1] == digest[3] != digest[2]  # k0 and k2 are the same image
