"""`make bench`: the performance goals of this project, measured on the machine at hand."""
