"""`ahcli`: the command line of ConflictAwareAH. Nothing but wiring: the work lives in extract/ and heads/."""
