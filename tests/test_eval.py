"""Evaluation: dataset adapters on tiny replicas of each dataset's distributed layout, task kinds on a
real (toy-encoder) unified model, metrics against direct computations, the toy world reproducing the
demo's numbers, the encoder cache, the command line."""

import json
import os
import pickle

import numpy as np
import pytest

import replicas
from pairfree.cli import main
from pairfree.eval import TASKS, run_task
from pairfree.eval import metrics as EM
from pairfree.eval.datasets import av_common, ave, flickr_soundnet, image_text, points3d, text_audio, vggss

pytest.importorskip("av")


# ------------------------------------------------------------------ metrics against direct computations


def test_ciou_and_auc_on_a_hand_computed_case():
    gt = EM.box_map([(0.0, 0.0, 0.5, 0.5)])  # the top-left quarter
    assert gt.sum() == 112 * 112
    pred = np.zeros((224, 224))
    pred[:112, :224] = 1  # the top half: all of the box plus as much outside
    assert EM.ciou(pred, gt) == pytest.approx(0.5)  # 112*112 / (112*112 + 112*112)
    cons = EM.box_map([(0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], consensus=2)
    assert cons[0, 0] == 1.0 and cons[200, 200] == 0.5 and cons[0, 200] == 0  # two annotators agree / one
    c = np.array([0.0, 0.3, 0.5, 0.8, 1.0])
    s = EM.localization_summary(c)
    assert s["cIoU@0.5"] == pytest.approx(0.6) and s["cIoU_mean"] == pytest.approx(0.52)
    from sklearn.metrics import auc

    thr = [0.05 * i for i in range(21)]
    assert s["AUC"] == pytest.approx(auc(thr, [np.mean(c >= t) for t in thr]))
    heat = np.arange(16, dtype=float).reshape(4, 4)
    b = EM.binarize(heat)
    assert b.sum() == 8 and b[3, 3] == 1 and b[0, 0] == 0  # min-max, then >= the median: the top half


def test_roc_auc_matches_sklearn(rng):
    from sklearn.metrics import roc_auc_score

    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 90).round(1)  # rounding makes ties
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(90)], np.r_[pos, neg])
    assert EM.roc_auc(pos, neg) == pytest.approx(want)


# ------------------------------------------------------------------ adapters on replicas of the distributed layouts


def test_ave_reads_annotations_and_extracts_frames_and_audio_from_videos(tmp_path):
    root = replicas.ave(tmp_path / "AVE_Dataset")
    d = ave.load(root, cache=tmp_path / "cache")
    assert d.coverage.expected == 4 and d.coverage.present == 3 and "vid3" in d.coverage.missing[0]
    assert [i.id for i in d.a[1]] == ["vid0", "vid1", "vid2"] and d.positives == [[0], [1], [2]]
    assert d.labels.tolist() == [0, 1, 2]  # Church bell, Dog, Rodents
    wav = d.a[1][1].source  # vid1's first event: 0.5 .. 1.5 s
    import soundfile as sf

    audio, rate = sf.read(wav)
    assert abs(len(audio) / rate - 1.0) < 0.1 and d.b[1][1].source.suffix == ".jpg"
    assert len(ave.load(root, cache=tmp_path / "cache", split="test").a[1]) == 2
    with pytest.raises(ValueError, match="AVE split must be one of"):
        ave.load(root, split="nope")


def test_vggss_frames_audio_video_missing_and_corrupt(tmp_path):
    root = replicas.vggss(tmp_path / "vggss")
    d = vggss.load(root, cache=tmp_path / "cache")
    assert d.coverage.expected == 5 and d.coverage.present == 4  # the video is extracted; one clip has nothing
    assert [i.id for i in d.b[1]] == ["zpWuikVorYg_000032", "gEvCUcZ6w88_000030", "JIemsK_0lXc_000364", "corrupt_000010"]
    loc = vggss.load_localization(root, cache=tmp_path / "cache", limit=3)
    assert len(loc.gt_maps) == 3 and loc.gt_maps[1].sum() == pytest.approx(
        EM.box_map([(0.45, 0.19, 0.58, 0.47), (0.1, 0.1, 0.2, 0.2)]).sum())
    assert loc.boxes[0] == [(0.403125, 0.253125, 0.6, 0.75)]


def test_flickr_soundnet_xml_consensus_and_missing_annotation(tmp_path):
    root = replicas.flickr_soundnet(tmp_path / "flickr")
    boxes = flickr_soundnet.read_boxes(root / "Annotations" / "10000130166.xml")
    assert boxes[0] == (32 / 256, 64 / 256, 160 / 256, 192 / 256) and len(boxes) == 3
    loc = flickr_soundnet.load_localization(root)
    assert loc.coverage.expected == 3 and loc.coverage.present == 2 and "no Annotations xml" in loc.coverage.missing[0]
    assert loc.gt_maps[0].max() == 1.0 and set(np.unique(loc.gt_maps[0])) <= {0.0, 0.5, 1.0}
    assert len(flickr_soundnet.load(root).a[1]) == 4  # retrieval: every pair present


def test_audiocaps_and_clotho_group_captions(tmp_path):
    d = text_audio.load_audiocaps(replicas.audiocaps(tmp_path / "ac"))
    assert [i.id for i in d.a[1]] == ["ytA", "ytB"] and d.coverage.missing == ["ytC: audio file not found"]
    assert d.positives == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and d.b[1][7].source == "caption 2 of ytB"
    c = text_audio.load_clotho(replicas.clotho(tmp_path / "clotho"))
    assert len(c.a[1]) == 2 and len(c.b[1]) == 10 and c.b[1][6].source == "b.wav says 2"


def test_coco_and_karpathy_splits(tmp_path):
    d = image_text.load_coco(replicas.coco(tmp_path / "coco"))
    assert d.coverage.expected == 3 and d.coverage.present == 2 and len(d.b[1]) == 10 and d.positives[1] == [5, 6, 7, 8, 9]
    k = image_text.load_coco_karpathy(replicas.karpathy(tmp_path / "k", "dataset_coco.json", "val2014"))
    assert [i.id for i in k.a[1]] == ["0", "1"]  # the two "test" images, not train / val
    f = image_text.load_flickr30k(replicas.karpathy(tmp_path / "f", "dataset_flickr30k.json", "flickr30k-images"))
    assert len(f.a[1]) == 2 and f.b[1][0].source == "sentence 0 about 0"


def test_objaverse_eshot_esc50_scanobjectnn(tmp_path):
    o = points3d.load_objaverse_lvis(replicas.objaverse_lvis(tmp_path / "obj"))
    assert o.coverage.expected == 4 and o.coverage.present == 2 and o.labels.tolist() == [0, 1]
    e = points3d.load_eshot(replicas.eshot(tmp_path / "eshot"))
    assert e.classes == ["dog", "piano"] and len(e.a[1]) == 4 and len(e.b[1]) == 3 and e.coverage.present == 7
    s = points3d.load_esc50(replicas.esc50(tmp_path / "esc"))
    assert s.classes == ["dog", "chirping birds", "chainsaw"] and s.labels.tolist() == [0, 1, 2]
    assert s.folds.tolist() == [1, 1, 2]
    assert s.coverage.missing == ["5-9032-A-0.wav: not in audio/"]
    pytest.importorskip("h5py")
    n = points3d.load_scanobjectnn(replicas.scanobjectnn(tmp_path / "sonn"), cache=tmp_path / "cache")
    assert n.labels.tolist() == [0, 4, 14, 4, 9] and np.load(n.items[2].source).shape == (2048, 3)
    assert n.classes[14] == "toilet" and len(n.templates) == 64


@pytest.mark.parametrize("with_dat", [True, False])
def test_modelnet40_from_the_ulip_dat_or_the_raw_txt(tmp_path, with_dat):
    d = points3d.load_modelnet40(replicas.modelnet40(tmp_path / "mn", with_dat), cache=tmp_path / "cache")
    assert d.classes[15] == "flower pot" and d.templates[0] == "a point cloud model of {}." and len(d.templates) == 64
    want = [0, 15, 39] if with_dat else [0, 15]
    assert d.labels.tolist() == want and d.coverage.present == len(want)
    assert np.load(d.items[0].source).shape == (256, 3)


def test_modelnet40_malicious_dat_is_refused_and_runs_nothing(tmp_path):
    root = replicas.modelnet40(tmp_path / "mn", with_dat=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "modelnet40_normal_resampled" / "modelnet40_test_8192pts_fps.dat", "wb") as f:
        pickle.dump([[Evil()], [np.array([0])]], f)
    from pairfree.media.safe_pickle import UnsafePickleError

    with pytest.raises(UnsafePickleError):
        points3d.load_modelnet40(root, cache=tmp_path / "cache")
    assert not marker.exists()


def test_missing_roots_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none of \['vggss.json', 'metadata/vggss.json'\] found"):
        vggss.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no frames/ or audio/ files"):
        flickr_soundnet.load(tmp_path)
    assert av_common.IMAGE_EXT[0] == ".jpg"


# ------------------------------------------------------------------ tasks end to end on a toy-encoder unified model


def test_tasks_run_end_to_end_on_replicas(searchable, tmp_path):
    """The whole path on replicas: videos -> frames and audio -> encode stores -> the model -> JSON + plots."""
    world, media, um, stores, index = searchable
    out, cache = tmp_path / "out", tmp_path / "cache"
    cases = {
        "ave/audio-image": replicas.ave(tmp_path / "ave"),
        "vggss/localization": replicas.vggss(tmp_path / "vggss"),
        "audiocaps/audio-text": replicas.audiocaps(tmp_path / "ac"),
        "modelnet40/3d-zero-shot": replicas.modelnet40(tmp_path / "mn", True),
        "eshot/audio-3d": replicas.eshot(tmp_path / "eshot"),
        "esc50/audio-zero-shot": replicas.esc50(tmp_path / "esc"),
        "vggss/counterfactual": tmp_path / "vggss",
    }
    for task, root in cases.items():
        r = run_task(um, TASKS[task], root, out, "toy-exmcr", cache=cache)
        saved = json.loads((out / "toy-exmcr" / (task.replace("/", "__") + ".json")).read_text())
        assert saved["metrics"] == json.loads(json.dumps(r["metrics"]))
        assert saved["model"]["fingerprint"] == um.fingerprint and saved["versions"]["pairfree"]
    ave_r = json.loads((out / "toy-exmcr" / "ave__audio-image.json").read_text())
    assert ave_r["coverage"]["present"] == 3 and ave_r["metrics"]["audio_to_image"]["R@1"] >= 0
    loc = json.loads((out / "toy-exmcr" / "vggss__localization.json").read_text())
    assert loc["metrics"]["pairs"] == 3 and loc["coverage"]["unreadable"] == 1  # the corrupt clip, reported
    assert (out / "toy-exmcr" / "plots" / "vggss__localization.png").is_file()
    ac = json.loads((out / "toy-exmcr" / "audiocaps__audio-text.json").read_text())
    assert ac["metrics"]["queries"] == {"audio": 2, "text": 10} and ac["coverage"]["missing"] == 1
    esc = json.loads((out / "toy-exmcr" / "esc50__audio-zero-shot.json").read_text())
    assert set(esc["metrics"]["per_fold_Acc@1"]) == {"1", "2"}
    assert (out / "toy-exmcr" / "plots" / "modelnet40__3d-zero-shot.png").is_file()


def test_retrieval_task_equals_the_metric_on_direct_embeddings(searchable, tmp_path):
    from pairfree import metrics

    world, media, um, stores, index = searchable
    r = run_task(um, TASKS["toy/audio-3d"], media, tmp_path / "out", "m", cache=tmp_path / "cache", plots=False)
    za = um.encode("audio", media / "test" / "audio")
    zp = um.encode("3d", media / "test" / "3d")
    want = metrics.paired_retrieval(za, zp, positives="index")
    for k in ("R@1", "R@5", "R@10", "mAP", "MedR"):
        assert r["metrics"]["audio_to_3d"][k] == pytest.approx(want["a_to_b"][k], abs=1e-9)
        assert r["metrics"]["3d_to_audio"][k] == pytest.approx(want["b_to_a"][k], abs=1e-9)


def test_a_second_model_with_the_same_encoders_reencodes_nothing(searchable, tmp_path, monkeypatch):
    import pairfree as pf
    import pairfree.encode as E

    world, media, um, stores, index = searchable
    root = replicas.esc50(tmp_path / "esc")
    run_task(um, TASKS["esc50/audio-zero-shot"], root, tmp_path / "out", "first", cache=tmp_path / "cache", plots=False)
    encoded = []
    real = E.encode
    monkeypatch.setattr(E, "encode", lambda *a, **k: encoded.append(real(*a, **k).encoded) or None)
    other = pf.UnifiedModel(pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=512)).fit(
        world.spaces["clip"], world.spaces["clap"], "text", progress=False),
        {s: um.encoder_specs[s] for s in ("clip", "clap")})
    run_task(other, TASKS["esc50/audio-zero-shot"], root, tmp_path / "out", "second", cache=tmp_path / "cache", plots=False)
    assert encoded and sum(encoded) == 0  # every audio row came from the first model's store


def test_toy_eval_reproduces_the_demo_numbers(searchable, tmp_path):
    """The same model scored in memory (the demo's evaluate_unified) and through media files + toy
    encoders + the eval harness: equal within the 16-bit image quantisation."""
    from pairfree.toy.evaluate import evaluate_unified
    from pairfree.toy.media import write_media

    world, media, um, stores, index = searchable
    scenes = write_media(world, tmp_path / "toymedia", splits=("test", "scenes"), progress=False)
    demo = evaluate_unified(um.model, world)
    from pairfree.unified import UnifiedModel

    m = UnifiedModel(um.model, {s: f"toy:{scenes}/{s}" for s in ("clip", "clap", "ulip")})
    for task, key in (("toy/image-audio", ("audio_to_image", "image_to_audio")), ("toy/audio-3d", ("audio_to_3d", "3d_to_audio")),
                      ("toy/text-audio", ("audio_to_text", "text_to_audio"))):
        r = run_task(m, TASKS[task], scenes, tmp_path / "out", "exmcr", cache=tmp_path / "cache", plots=False)
        for k in key:
            for metric in ("R@1", "R@5", "mAP"):
                assert r["metrics"][k][metric] == pytest.approx(demo[k][metric], abs=0.006), (task, k, metric)
    zs = run_task(m, TASKS["toy/3d-zero-shot"], scenes, tmp_path / "out", "exmcr", cache=tmp_path / "cache", plots=False)
    for metric in ("Acc@1", "Acc@3", "Acc@5"):
        assert zs["metrics"][metric] == pytest.approx(demo["3d_zero_shot"][metric], abs=1e-9)
    loc = run_task(m, TASKS["toy/localization"], scenes, tmp_path / "out", "exmcr", cache=tmp_path / "cache", plots=False)
    assert loc["metrics"]["cIoU@0.5"] > 0.6  # a random map scores ~0.4 on these scenes (docs/datasets.md)


def test_eval_cli_list_summary_and_errors(searchable, tmp_path, capsys):
    world, media, um, stores, index = searchable
    assert main(["eval", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "modelnet40/3d-zero-shot" in listing and "--root vggss=DIR" in listing
    assert main(["eval", "--pretrained", str(media.parent / "model"), "--task", "esc50/audio-zero-shot", "--root",
                 f"esc50={replicas.esc50(tmp_path / 'esc')}", "--out", str(tmp_path / "out"), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "| model | task |" in capsys.readouterr().out
    assert main(["eval", "--summary", str(tmp_path / "out")]) == 0
    assert "esc50/audio-zero-shot (Acc@1 / Acc@5)" in capsys.readouterr().out
    assert main(["eval", "--pretrained", str(media.parent / "model"), "--task", "nope/x"]) == 2
    assert "unknown task 'nope/x'" in capsys.readouterr().err
