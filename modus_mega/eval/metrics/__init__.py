"""The MODUS paper's metrics, one module per kind of output; each function states its protocol.

| module | metrics |
|---|---|
| ``depth`` | AbsRel, delta < 1.25^k, RMSE after a per-image least-squares scale and shift |
| ``normals`` | mean / median angular error, % of pixels within 11.25 / 22.5 / 30 degrees |
| ``segmentation`` | semantic mIoU; matched mean IoU of instance segments (sam_seg) |
| ``edges`` | boundary precision / recall / F1 with a pixel tolerance (canny, sam_edge) |
| ``detection`` | mAP@0.5 and mAP@[.5:.95] through pycocotools; grounding accuracy at IoU 0.5 |
| ``captions`` | attribute recall of colours, shapes, objects and counts; relation accuracy |
| ``features`` | cosine similarity to the ground truth; k-NN top-1 / top-5 retrieval of scene classes |
| ``geneval`` | GenEval-style model-free checks of a generated image against its prompt's facts |

Scene facts (``facts``) are plain descriptions that the caption and text -> rgb metrics read;
data sources build them, so no metric depends on a particular scene generator.
"""
