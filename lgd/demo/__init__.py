"""The bundled demo (lgd-demo): LGD on real aerial tree images with a small ImageNet-pretrained RetinaNet, small
enough to train on a CPU. It lives apart from the library, as detectron2's demo/ and projects/ do: nothing in lgd
imports it.

- assets, deepforest: the fetched assets and the deepforest images as tiled COCO datasets (folds, registration);
- backbone: MobileNetV2 + FPN as a detectron2 backbone; configs/: the demo's LazyConfig;
- run: one training run of one method; session: a whole lgd-demo invocation (its runs, summary, console);
- report, plots: the comparison and cost tables, the op report, the figures.
"""
