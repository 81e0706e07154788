# Sourced by the benchmark scripts: CPU lists as taskset takes them.

# count_cpus "0-7,9" -> 9
count_cpus() {
    python3 -c "import sys
n=0
for part in sys.argv[1].split(','):
    a,_,b=part.partition('-'); n+=int(b or a)-int(a)+1
print(n)" "$1"
}
