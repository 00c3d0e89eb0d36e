"""captioner.init_from: the encoder and decoder start from Hugging Face folders (tiny random models
saved with save_pretrained here), train, and export a captioner that loads without those folders."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.models import captioner as cap
from tldr_tasks.stages import train_captioner as tc

torch.set_num_threads(1)

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
WORDS = "a an the of on in with red green blue yellow circle square triangle star photo background small large".split()


def save_vision(folder, family: str) -> None:
    from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

    sizes = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64)
    model = ViTModel(ViTConfig(**sizes)) if family == "vit" else DeiTModel(DeiTConfig(**sizes))
    model.save_pretrained(folder)
    if family == "deit":  # DeiT expects ImageNet statistics, not [-1, 1]
        (folder / "preprocessor_config.json").write_text(json.dumps(IMAGENET))


def save_text(folder, family: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertLMHeadModel,
        BertTokenizerFast,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    if family == "gpt2":
        vocab = {w: i for i, w in enumerate(["<|endoftext|>", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                           bos_token_id=0, eos_token_id=0))
    else:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                          *WORDS])})
        model = BertLMHeadModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                           is_decoder=True))
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def config(init_from: list[str], *extra: str):
    return load_config(None, ["captioner.image_size=32", "captioner.epochs=1", "captioner.batch_size=32",
                              "captioner.codebook_size=64", "captioner.warmup_steps=2", "captioner.loader_workers=0",
                              "captioner.init_from=" + ",".join(init_from), *extra])


@pytest.mark.parametrize("vision,text", [("vit", "gpt2"), ("deit", "bert")])
def test_init_from_pretrained_folders_trains_and_exports(vision, text, tiny_crawl, tmp_path):
    save_vision(tmp_path / "enc", vision)
    save_text(tmp_path / "dec", text)
    cfg = config([str(tmp_path / "dec"), str(tmp_path / "enc")])  # any order: the role comes from config.json

    # Built, the captioner holds the pretrained weights and uses the decoder's tokenizer.
    tokenizer = cap.pretrained_tokenizer(str(tmp_path / "dec"))
    model = cap.build_captioner(cfg.captioner, tokenizer)
    enc = load_file(tmp_path / "enc" / "model.safetensors")
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items() if k in model.encoder.state_dict())
    dec = load_file(tmp_path / "dec" / "model.safetensors")
    ours = model.decoder.state_dict()
    assert sum(torch.equal(ours[k], v) for k, v in dec.items() if k in ours) >= len(dec) - 1  # all but ties
    assert model.arch["vocab_size"] == len(tokenizer) and model.arch["n_positions"] == 64

    io = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path / "run"))
    result = tc.run(cfg, io)
    assert result.metrics["steps"] > 0 and result.metrics["final_lm_loss"] < 10
    shutil.rmtree(tmp_path / "enc")  # the export stands alone
    shutil.rmtree(tmp_path / "dec")
    loaded, loaded_tok = cap.load_captioner(io.captioner_dir)
    assert loaded.encoder.config.model_type == vision and loaded.decoder.config.model_type == text
    assert loaded_tok.convert_ids_to_tokens(loaded_tok.bos_token_id) == tokenizer.bos_token
    captions = loaded.generate_captions(torch.zeros(2, 3, 32, 32), loaded_tok, num_beams=1, max_new_tokens=5)
    assert len(captions) == 2 and all(set(c.split()) <= set(WORDS) for c in captions)


def test_deit_pixels_are_renormalised_to_imagenet_statistics(tmp_path):
    save_vision(tmp_path / "enc", "deit")
    save_text(tmp_path / "dec", "gpt2")
    cfg = config([str(tmp_path / "enc"), str(tmp_path / "dec")])
    model = cap.build_captioner(cfg.captioner, cap.pretrained_tokenizer(str(tmp_path / "dec"))).eval()
    assert model.arch["pixel_mean"] == IMAGENET["image_mean"]
    grey = torch.zeros(1, 3, 32, 32)  # 0 in [-1, 1] is pixel value 0.5
    expected = (0.5 - torch.tensor(IMAGENET["image_mean"])) / torch.tensor(IMAGENET["image_std"])
    seen = {}
    model.encoder.embeddings.patch_embeddings.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    model.encode(grey)
    assert torch.allclose(seen["x"][0, :, 0, 0], expected)


def test_init_from_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face folder"):
        cap.pretrained_folders([str(tmp_path / "missing")])
    save_vision(tmp_path / "a", "vit")
    save_vision(tmp_path / "b", "vit")
    with pytest.raises(ValueError, match="two vision models"):
        cap.pretrained_folders([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="'t5' model"):
        cap.pretrained_folders([str(tmp_path / "c")])


def test_init_from_copies_a_remote_folder_once(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("TLDR_CACHE_DIR", str(tmp_path / "cache"))
    save_vision(tmp_path / "enc", "vit")
    fs = fsspec.filesystem("memory")
    for name in os.listdir(tmp_path / "enc"):
        fs.pipe(f"/models/vit/{name}", (tmp_path / "enc" / name).read_bytes())
    folders = cap.pretrained_folders(["memory://models/vit"])
    assert folders["vision"].startswith(str(tmp_path / "cache"))
    assert sorted(os.listdir(folders["vision"])) == sorted(os.listdir(tmp_path / "enc"))
    fs.rm("/models/vit", recursive=True)
    assert cap.pretrained_folders(["memory://models/vit"]) == folders  # cached: not fetched again
