# Sourced by the benchmark scripts: CPU lists as taskset takes them.

# count_cpus "0-7,9" -> 9
count_cpus() {
    python3 -c "import sys
n=0
for part in sys.argv[1].split(','):
    a,_,b=part.partition('-'); n+=int(b or a)-int(a)+1
print(n)" "$1"
}

# The first half of this machine's CPUs (at least one), and the rest (all
# of them on a 1-CPU machine): a server and its load generator on one box.
first_half_cpus() {
    local n; n=$(nproc)
    local h=$(( n / 2 > 0 ? n / 2 : 1 ))
    echo "0-$(( h - 1 ))"
}
second_half_cpus() {
    local n; n=$(nproc)
    local h=$(( n / 2 > 0 ? n / 2 : 1 ))
    if [ "$n" -gt 1 ]; then echo "$h-$(( n - 1 ))"; else echo "0"; fi
}
