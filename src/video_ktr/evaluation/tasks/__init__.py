"""Video reasoning benchmarks: official annotation files and Video-R1-eval files -> one row schema,
and metrics with the breakdowns each leaderboard reports.

Every loader returns plain dicts in the Video-R1 training schema plus two keys::

    {"problem_id": int, "problem": str, "data_type": "video",
     "problem_type": "multiple choice" | "numerical" | "regression" | "free-form",
     "options": ["A. text", ...] | None, "solution": "<answer>X</answer>",
     "path": "./videos/x.mp4", "data_source": str,
     "meta": {breakdown fields, ids, ...}, "uid": "videoholmes:zzFAKEhol01:1"}

``uid`` is stable across runs of the same file (used to resume an evaluation). ``problem_id`` of an
official file is the 1-based position in load order.

Media paths and ``--media_root``
--------------------------------
Point the media root at the benchmark's *own* folder (the one the official release unpacks to).
``path`` is relative to it, Video-R1 style (``root + path[1:]``). Video-R1-eval paths start with
``./Evaluation/<Bench>/``; :func:`media_candidates` also tries them with ``./Evaluation/`` and with
``./Evaluation/<Bench>/`` removed, so one root serves both formats. For every candidate the extensions
``.mp4 .MP4 .mkv .webm .avi`` are tried too (Video-R1 converted everything to ``.mp4``).

==============  ==========================================  ===========================================
benchmark       ``path``                                    also tried (``meta["path_candidates"]``)
==============  ==========================================  ===========================================
videoholmes     ``./videos/{video ID}.mp4``                 ``./videos_cropped/…`` (lmms-eval unzip)
videomme        ``./data/{videoID}.mp4``                    ``./videos/…``, ``./{videoID}.mp4``
videommmu       ``./{Art|Business|Science|Medicine|``       ``./videos/{id}.mp4``, ``./{id}.mp4``;
                ``Humanities|Engineering}/{id}.mp4``        Adaptation: ``meta["question_only_path"]``
                (lmms-eval layout)                          = ``./question_only/{id}_image.mp4`` (never
                                                            substituted for the lecture video)
mmvu            ``./videos/{Subject_folder}/{n}.mp4``       ``./{Subject_folder}/{n}.mp4``
                (tail of the HF ``video`` URL)
mvbench         ``./{VideoChat2 folder}/{video}``, e.g.     ``./{task}/{video}``; lmms-eval's
                ``./star/Charades_v1_480/x.mp4`` (same as   ``ssv2_video_mp4``/``nturgbd_convert``.
                Video-R1-eval); unknown task:               Pre-cut ``*_segment`` folders are NOT tried
                ``./{task}/{video}``                        (the clip bounds would be applied twice)
tempcompass     ``./videos/{video_id}.mp4``                 ``./{video_id}.mp4``
vsibench        ``./{dataset}/{scene_name}.mp4``            —
==============  ==========================================  ===========================================

Conversion choices
------------------
* TempCompass yes/no questions become ``multiple choice`` rows with options ``["A. yes", "B. no"]`` so
  the same exact-letter scorer applies; ``meta["task_type"]`` records ``"yes_no"`` vs ``"multi-choice"``.
* VideoMMMU/MMVU open questions are ``numerical`` when the answer is a number, else ``free-form``.
  ``<image N>`` placeholders are removed from VideoMMMU questions (then stripped), as Video-R1-eval did.
* Video-R1-eval rows keep every extra key in ``meta`` (``process`` is dropped); breakdown fields that
  the file lacks are derived where the design says how, and flagged (``meta["track_inferred"]``, ...).
  VSI-Bench files carry no ``question_type``: use :func:`join_official_meta` with the official rows.

Modules
-------
* :mod:`.base`: the schema's constants, :class:`~.base.BenchmarkDataError`, reading files, validated accessors.
* :mod:`.official`: the seven official annotation formats -> rows.
* :mod:`.video_r1`: Video-R1-eval files -> rows; :func:`~.video_r1.join_official_meta`.
* :mod:`.registry`: :data:`~.registry.BENCHMARKS`, :func:`~.registry.load_benchmark`, media paths.
* :mod:`.metrics`: :func:`~.metrics.compute_metrics`, :func:`~.metrics.format_table`.
"""
