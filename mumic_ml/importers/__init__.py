"""Importers: a public benchmark's own files in, a batch folder that `mumic ingest` takes unchanged out.

One module per format (`coco`, `voc`, `openimages`) reads the annotations, maps the dataset's class ids to names
and says for every image which classes it shows, which were verified absent and which nobody could decide.
`batch_folder` does the rest for all of them: it finds each image, refuses unsafe paths, writes the batch (images,
taxonomy, rejections, manifest last) under a staging name and swaps it in whole.
"""
