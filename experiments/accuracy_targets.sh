#!/bin/bash
# Issue 26's done-when runs: the default command on visible labels, three seeds, int8 and float scored on a
# separately generated test set and on its cause-labelled twin (the stress set). Resumable: a step whose output
# exists is skipped. Then: python experiments/accuracy_targets.py --work DIR
set -euo pipefail
dir=${1:?usage: experiments/accuracy_targets.sh DIR}
seeds=${SEEDS:-0 1 2}
mkdir -p "$dir" && cd "$dir"
[ -d train ] || semhinet synth train --per-class 150 --seed 101
[ -d test ] || semhinet synth test --per-class 100 --seed 202
[ -d test_cause ] || semhinet synth test_cause --per-class 100 --seed 202 --labels cause
for s in $seeds; do
  [ -f run$s/float.keras ] || semhinet train train --out run$s --seed $s --overwrite
  [ -f run$s/model_int8.tflite ] || semhinet convert run$s
  for m in float.keras model_int8.tflite; do
    [ -f eval_${s}_$m.json ] || semhinet eval run$s/$m --data test --split all --json eval_${s}_$m.json
    [ -f cause_${s}_$m.json ] || semhinet eval run$s/$m --data test_cause --split all --json cause_${s}_$m.json
  done
  [ -f compare_$s.json ] || semhinet compare run$s --data test --split all --not-worse --json compare_$s.json || true
done
