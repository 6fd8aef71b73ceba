"""The one evaluation protocol: FVD / IS / CLIPSIM / conditional accuracy, detectors, real statistics.

    frechet.py           frechet (value + sqrt path), frechet_distance, feature_stats, GaussianStats (float64)
    metrics.py           torchmetrics Metrics: FVD, VideoInceptionScore, CLIPSIM, ConditionalAccuracy
    detectors.py         DETECTORS registry, load_detector, quantize (the one [-1, 1] -> uint8 rule)
    i3d.py               native Inception-I3D (loads i3d_pretrained_400.pt strictly)
    shapes_evaluator.py  the shipped evaluator for the embedded shapes data
    real_stats.py        real statistics cached under <cache_dir>/real_stats/, keyed by the protocol and the data
    distributed.py       rank / world, sharding, gathering; rank 0's decisions broadcast to every rank
    protocol.py          evaluate_method / evaluate_videos / evaluate_run (DDP-sharded generation)
    callback.py          EvaluationCallback (Lightning; imported on use)
"""
