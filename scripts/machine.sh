# How busy the machine is, for the benchmark scripts (sourced, not run):
# the load average and the share of CPU time the hypervisor gave to other
# guests ("steal", /proc/stat), which on a shared VM moves latency figures
# more than anything the proxy does.

# loadavg prints the 1, 5 and 15 minute load averages.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# cpu_ticks prints the steal ticks and all ticks of every CPU since boot.
cpu_ticks() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat; }

# steal_since <ticks from cpu_ticks> prints the steal share since then.
steal_since() {
	local s1 t1
	read -r s1 t1 < <(cpu_ticks)
	awk -v s0="${1% *}" -v t0="${1#* }" -v s1="$s1" -v t1="$t1" \
		'BEGIN { if (t1 > t0) printf "%.1f%%\n", 100 * (s1 - s0) / (t1 - t0); else print "n/a" }'
}
