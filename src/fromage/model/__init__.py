"""The method: frozen backbones, the trainable maps and [RET], and both training objectives.

``fromage.py`` is the architecture (docs/method.md, "Parts"), ``objectives.py`` the two losses,
``pretrained.py`` / ``released.py`` / ``load.py`` how trained weights are saved and loaded.
"""
