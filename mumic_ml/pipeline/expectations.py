"""The data expectations by name and meaning, apart from the Great Expectations code that checks them
(`validate`), so the Dagster code location can declare its asset checks without importing Great Expectations."""

# What each outcome means, in report order: Dagster declares one asset check per name, with this as its
# description, before anything runs (so before params.yaml's thresholds are known; the outcome's own description
# names them).
EXPECTATION_MEANINGS = {
    "non_empty": "The manifest holds at least one accepted image.",
    "image_id_present": "Every row has an image_id.",
    "unique_image_id": "No image_id appears twice.",
    "sha256_present": "Every row has the content hash (sha256) of its picture.",
    "unique_sha256": "No picture appears twice under different names: the same pixels would count twice.",
    "labels_per_image": "Every image labels between expectations.min_labels_per_image and max_labels_per_image "
    "classes, counting present, verified negative and unknown ones.",
    "image_width": "Every image is between ingest.min_side and ingest.max_side pixels wide.",
    "image_height": "Every image is between ingest.min_side and ingest.max_side pixels high.",
    "labels_in_taxonomy": "Every label is a class of the taxonomy, spelt exactly; a typo would be a new class.",
    "min_positives_per_class": "Every class has at least expectations.min_positives_per_class images to learn "
    "and measure it from; a warning unless expectations.min_positives_blocking.",
}
EXPECTATION_NAMES = tuple(EXPECTATION_MEANINGS)
SPLIT_EXPECTATION_MEANINGS = {
    "no_leakage": "No picture (sha256) is in two splits: a test image the model trained on would inflate its score.",
    "non_empty_splits": "Train, val and test each hold images, so the model can be trained, selected and measured.",
}
SPLIT_EXPECTATION_NAMES = tuple(SPLIT_EXPECTATION_MEANINGS)
