"""LazyConfig files for lgd-train (lgd.tools.train_net); load them with detectron2.config.LazyConfig.load(path).

<detector>_R_<depth>_FPN_<schedule>[_ms]_lgd.py: RetinaNet, FCOS, Faster R-CNN, Mask R-CNN x R50/R101 x 1x/2x x
single/multi-scale, each one call of _lgd_config.make() (the paper's settings; see its docstring); the DCN rows
(make_dcn) and the Pascal VOC and CrowdHuman ones (make_voc, make_crowdhuman). docs/paper.md: the paper's rows.
"""
