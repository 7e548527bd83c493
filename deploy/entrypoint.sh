#!/bin/sh
# Every container of the image starts here. The working directory is the project folder, a volume, so data, models,
# runs and caches outlive containers; its params.yaml is always the one this image was built with, so a new image
# brings its configuration along.
set -eu
ln -sfn /opt/mumic/params.yaml params.yaml
exec "$@"
