# Healthy when the lightnode process of this release is alive and says it runs.
cd "${installPath}/lightnode"
pid=$(cat lightnode.pid)
s=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
[ -n "$s" ] && [ "$s" != Z ] && grep -q "running" lightnode.log
