module tlspeer

go 1.21
