set server be_first/f1 state drain
set server be_app/nope state ready
show backend
get weight be_app/up1
set server be_app/up2 weight 300
set server be_first/f1 state ready