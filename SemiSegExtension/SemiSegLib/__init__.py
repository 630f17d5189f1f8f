"""Qt-free logic of the SemiSeg Slicer module: it works on MRML nodes and calls the ``semiseg`` core.

Modules: ``nodes`` (volumes/segmentations <-> images, markups -> prompts), ``pseudolabel`` (SAM and model
segments with provenance), ``review`` (the review queue), ``training`` (the background training process),
``evaluation`` (Dice table and plot), ``dependencies`` (resources, first-use installs). ``SegmentEditorSAMEffect``
is the Segment Editor effect and needs the Slicer application.
"""
