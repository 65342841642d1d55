# The policy strings of docs/BENCHMARKS.md "The composable runtime side by side" (issue 11, point 8): `source` this file,
# then run the kvtool bench commands written there.
P4="heads=duo:0.5,k=4,v=4,krope=pre"
P8OLD="heads=duo:0.125,k=4,v=3,sink=4,recent=224,krope=pre,buffer=32"
P8="heads=duo:0.125,k=4,v=3,sink=4,recent=864,buffer=0,wk=4,wv=4,krope=pre,vgroup=64"
P12="heads=duo:0.125,k=4,v=3,sink=4,recent=480,buffer=0,wk=4,wv=4,krope=pre,vgroup=64"
QW8="heads=none,sink=4,recent=992,buffer=0,wk=4,wv=4,krope=pre,vgroup=64"
HS="heads=duo:0.5"
QA="heads=all,k=4,v=4,krope=pre"
PCA="heads=all,krank=auto:0.99,vrank=auto:0.99"
POD="heads=all,pod=map"
PODH="heads=duo:0.5,pod=map"
PCAQ="heads=duo:0.5,k=4,v=4,krank=auto:0.99,vrank=auto:0.99"
