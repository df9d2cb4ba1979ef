#!/bin/sh
# A small batch job: count the words of every input file and summarise them.
set -e
echo "running on $(hostname) in $CRIMPL_JOB_DIR"
mkdir -p results
for f in data/*.txt; do
  printf '%s %s\n' "$(wc -w < "$f")" "$(basename "$f")"
done | sort -rn > results/word-counts.txt
awk '{n += $1} END {print n " words in " NR " files"}' results/word-counts.txt > results/summary.txt
cat results/summary.txt
