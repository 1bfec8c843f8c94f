"""pairfree.media: images, audio, texts (points / records / safe pickle in test_media_points.py)."""

import io
import json

import numpy as np
import pytest

from pairfree.media import MediaError, fix_length, int16_roundtrip, load_audio, load_image, load_texts
from pf_testing import reference

Image = pytest.importorskip("PIL.Image")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

DEMO = ("BBQ", "toilet", "train")


# ------------------------------------------------------------------------------------- images


def _rgb_pattern(w=6, h=4):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :] * 40
    a[..., 1] = np.arange(h)[:, None] * 60
    a[..., 2] = 200
    return a


def test_image_rgb_png_roundtrip(tmp_path):
    a = _rgb_pattern()
    Image.fromarray(a).save(tmp_path / "x.png")
    im = load_image(tmp_path / "x.png")
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), a)
    assert np.array_equal(np.asarray(load_image((tmp_path / "x.png").read_bytes(), name="x.png")), a)


def test_image_rgba_composited_on_white(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = [[0, 255, 128], [0, 255, 128]]
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    out = np.asarray(load_image(tmp_path / "x.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert out[0, 1].tolist() == [200, 0, 0]  # opaque -> colour
    alpha = 128 / 255  # half transparent -> blend with white
    np.testing.assert_allclose(out[0, 2], [200 * alpha + 255 * (1 - alpha), 255 * (1 - alpha), 255 * (1 - alpha)], atol=1.5)


def test_image_grey_palette_and_16bit(tmp_path):
    g = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], g) for c in range(3))

    p = Image.fromarray(_rgb_pattern()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "p.png")), np.asarray(p.convert("RGB")))

    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "pt.png"))
    idx = np.asarray(p)
    assert (out[idx == 0] == 255).all()  # palette entry 0 is transparent -> white

    g16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png")).astype(int)
    np.testing.assert_allclose(out[..., 0], np.rint(g16 / 257), atol=1)


def test_image_exif_orientation_applied(tmp_path):
    a = _rgb_pattern(6, 4)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "o.png", exif=exif)
    out = np.asarray(load_image(tmp_path / "o.png"))
    assert out.shape == (6, 4, 3)
    assert np.array_equal(out, np.rot90(a, k=-1))  # clockwise


def test_image_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image")
    with pytest.raises(MediaError, match="bad.jpg: not a readable image"):
        load_image(tmp_path / "bad.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(MediaError, match="cut.jpg: not a readable image .*truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(MediaError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    assert issubclass(MediaError, ValueError)


@pytest.mark.parametrize("name", DEMO)
def test_demo_jpeg(name):
    from PIL import ImageOps

    path = reference("assets", f"{name}.jpeg")
    im = load_image(path)
    with Image.open(path) as raw:
        expect = ImageOps.exif_transpose(raw).convert("RGB")
    assert im.mode == "RGB" and im.size == expect.size and max(im.size) <= 1920
    assert np.array_equal(np.asarray(im), np.asarray(expect))


# ------------------------------------------------------------------------------------- audio


def _tone(sr, seconds=0.5, freq=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return x if channels == 1 else np.stack([x, 0.25 * x], axis=1)


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def test_audio_wav_stereo_resampled_to_mono(tmp_path):
    x = _tone(32000, channels=2)
    sf.write(tmp_path / "s.wav", x, 32000, subtype="PCM_16")
    y = load_audio(tmp_path / "s.wav", 48000)
    pcm = sf.read(tmp_path / "s.wav", dtype="float32")[0]
    expect = soxr.resample(pcm.mean(axis=1), 32000, 48000, quality="HQ")
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 24000
    np.testing.assert_allclose(y, expect, atol=1e-6)
    assert abs(_peak_hz(y, 48000) - 440) < 3


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_audio_formats(tmp_path, fmt):
    if fmt.upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    x = _tone(44100, seconds=1.0)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, x, 44100, format=fmt.upper())
    y = load_audio(path, 16000)
    assert abs(len(y) - 16000) <= 1200  # mp3 adds encoder delay / padding
    assert abs(_peak_hz(y, 16000) - 440) < 3
    if fmt == "flac":  # lossless: equal to a direct decode + resample
        np.testing.assert_allclose(y, soxr.resample(sf.read(path, dtype="float32")[0], 44100, 16000, quality="HQ"), atol=1e-6)


def test_audio_errors(tmp_path):
    sf.write(tmp_path / "ok.wav", _tone(16000), 16000, subtype="PCM_16")
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.wav: truncated"):
        load_audio(tmp_path / "cut.wav", 16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00junk" * 10)
    with pytest.raises(MediaError, match="junk.wav: not a readable audio file"):
        load_audio(tmp_path / "junk.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match="empty.wav: no audio samples"):
        load_audio(tmp_path / "empty.wav", 16000)
    flac = io.BytesIO()
    sf.write(flac, _tone(16000), 16000, format="FLAC")
    with pytest.raises(MediaError, match="cut.flac"):
        load_audio(flac.getvalue()[: len(flac.getvalue()) // 2], 16000, name="cut.flac")
    if "MP3" in sf.available_formats():
        mp3 = io.BytesIO()
        sf.write(mp3, _tone(16000, seconds=2.0), 16000, format="MP3")
        with pytest.raises(MediaError, match="cut.mp3: truncated"):
            load_audio(mp3.getvalue()[: len(mp3.getvalue()) // 2], 16000, name="cut.mp3")


@pytest.mark.parametrize("name", DEMO)
def test_demo_wav(name):
    path = reference("assets", f"{name}.wav")
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (32000, 1, "PCM_16")
    y = load_audio(path, 48000)
    assert y.dtype == np.float32 and len(y) == info.frames * 3 // 2 == 480000
    pcm = sf.read(path, dtype="float32")[0]
    np.testing.assert_allclose(y, soxr.resample(pcm, 32000, 48000, quality="HQ"), atol=1e-6)


def _laion_fill(x, max_len, data_filling):
    """laion_clap.training.data.get_audio_features, padding branch (torch semantics)."""
    import torch
    import torch.nn.functional as F

    audio = torch.from_numpy(x)
    if data_filling == "repeatpad":
        audio = audio.repeat(int(max_len / len(audio)))
        audio = F.pad(audio, (0, max_len - len(audio)), mode="constant", value=0)
    elif data_filling == "pad":
        audio = F.pad(audio, (0, max_len - len(audio)), mode="constant", value=0)
    elif data_filling == "repeat":
        audio = audio.repeat(int(max_len / len(audio)) + 1)[:max_len]
    return audio.numpy()


@pytest.mark.parametrize("mode", ["pad", "repeatpad", "repeat"])
@pytest.mark.parametrize("length", [1, 7, 10, 33, 49])
def test_fix_length_matches_laion_clap(mode, length):
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    out = fix_length(x, 50, mode)
    assert out.shape == (50,)
    np.testing.assert_array_equal(out, _laion_fill(x, 50, mode))


def test_fix_length_crop():
    x = np.arange(100, dtype=np.float32)
    np.testing.assert_array_equal(fix_length(x, 30), x[:30])
    rng, check = np.random.default_rng(3), np.random.default_rng(3)
    idx = int(check.integers(0, 100 - 30 + 1))  # laion_clap: randint(0, overflow + 1)
    np.testing.assert_array_equal(fix_length(x, 30, "crop", rng=rng), x[idx : idx + 30])
    np.testing.assert_array_equal(fix_length(x[:10], 30, "crop"), x[:10])
    with pytest.raises(ValueError, match="unknown mode"):
        fix_length(x, 5, "stretch")


def test_int16_roundtrip_matches_laion_clap():
    x = np.linspace(-1.5, 1.5, 1001).astype(np.float32)
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    np.testing.assert_array_equal(int16_roundtrip(x), (q / 32767.0).astype(np.float32))


# ------------------------------------------------------------------------------------- texts


def test_texts_txt_strips_and_skips_blank(tmp_path):
    (tmp_path / "t.txt").write_text("\ufeff a dog \n\n   \ncats  on a mat\n")
    assert load_texts(tmp_path / "t.txt") == ["a dog", "cats  on a mat"]


def test_texts_tables(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"id": [1, 2, 3], "caption": ["one", "", "three, with comma"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    assert load_texts(tmp_path / "t.csv") == ["one", "three, with comma"]  # 'caption' found by default
    assert load_texts(tmp_path / "t.csv", column="id") == ["1", "2", "3"]
    with pytest.raises(MediaError, match=r"t.csv: no column 'text'; available columns: \['id', 'caption'\]"):
        load_texts(tmp_path / "t.csv", column="text")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(["a", "b"])) + "\n")
    assert load_texts(tmp_path / "t.jsonl") == ["a", "b"]
    with pytest.raises(MediaError, match="no column 'caption'"):
        load_texts(tmp_path / "t.jsonl", column="caption")
    pytest.importorskip("pyarrow")
    df.to_parquet(tmp_path / "t.parquet")
    assert load_texts(tmp_path / "t.parquet", column="caption") == ["one", "three, with comma"]
    with pytest.raises(MediaError, match=r"available columns: \['id', 'caption'\]"):
        load_texts(tmp_path / "t.parquet", column="nope")


def test_texts_empty(tmp_path):
    for name, content in (("e.txt", ""), ("w.txt", " \n\n \t\n"), ("e.csv", ""), ("h.csv", "text\n"), ("e.jsonl", "")):
        (tmp_path / name).write_text(content)
        with pytest.raises(MediaError, match=f"no texts in .*{name}"):
            load_texts(tmp_path / name)
