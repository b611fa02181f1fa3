#!/bin/bash
# Fifth and sixth research rounds (explore/README.md): the research loop, 4 seeds per setting, many runs
# side by side (on one GPU machine, or P=2 on 2 CPU cores). Writes $OUT/summary.txt ("arm seed accuracy seconds") and the logs.
#   OUT=/tmp/screen ARMLIST="base proc25" EXTRA="--iters 1200 --eval_every 200" P=16 bash benchmarks/explore/screen_gpu.sh
# (DAFL_FASHION_MNIST must point at the four IDX files if the Debian package is not installed.)
export PYTHONPATH=$PWD
mkdir -p $OUT/logs; (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "CPU, $(nproc) cores") > $OUT/gpu.txt
B="${EXTRA:-} --gen small --width 64 --mixup 1 --adv 0.1 --s_steps 10 --div 1 --cutmix 0.5 --s_warmup 500 --threads 1"
declare -A ARMS=( [base]="" [proc25]="--proc 0.25" [proc50]="--proc 0.5" [fdiv1]="--fdiv 1" [fdiv5]="--fdiv 5" [bng4]="--bn_groups 4" [combo]="--proc 0.25 --fdiv 1 --bn_groups 4" [procfdiv]="--proc 0.25 --fdiv 5" [procbig]="--proc 0.25 --proc_scale 1.5" [proc2]="--proc 0.25 --proc_scale 2" [procbig50]="--proc 0.5 --proc_scale 1.5" [procbig3]="--proc 0.25 --proc_scale 1.5 --proc_shapes 3" [procsym]="--proc 0.25 --proc_scale 1.5 --proc_sym 1" [slr2]="--s_lr 0.2" [slr3]="--s_lr 0.3" [wd2]="--wd 2e-3" [reflect]="--gpad reflect" [replicate]="--gpad replicate" [prio1]="--prio 1" [prio05]="--prio 0.5" [gcos]="--g_cos 1" [dir1]="--dir 1" [dir01]="--dir 0.1" )
for s in 0 1 2 3; do for arm in ${ARMLIST:-base proc25 proc50 fdiv1 fdiv5 bng4 combo}; do echo "$arm $s ${ARMS[$arm]}"; done; done | sed "s/ *$//" > $OUT/jobs.txt
run() { arm=$1; s=$2; shift 2; python benchmarks/explore/generator_loop.py $B --seed $s "$@" > $OUT/logs/${arm}_s$s.log 2>&1; tail -1 $OUT/logs/${arm}_s$s.log | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$arm', $s, d['final'], d['secs'])" >> $OUT/summary.txt; }
export -f run; export B
timeout ${TLIM:-560} xargs -P ${P:-10} -L 1 bash -c 'run "$@"' _ < $OUT/jobs.txt
sort $OUT/summary.txt; tar czf $OUT/logs.tgz -C $OUT logs && rm -r $OUT/logs
