#!/bin/bash
# The README's newcomer path on a CPU: calibrate with no arguments, then eval at the recipe's verified lengths.
set -e
date -u
/usr/bin/time -v patchattn calibrate > calibrate.log 2> calibrate.err
date -u
/usr/bin/time -v patchattn eval --recipe recipe.json -o results > eval.log 2> eval.err
date -u
