"""Side-by-side benchmarks behind the ``rlweights bench*`` commands.

One module per command: ``ops`` (target updates and EMAs), ``sb3`` (the SB3 plug-in),
``drift`` (drift monitoring), ``train`` (native agents against SB3), ``distributed``
(averaging across processes), ``startup`` (the command's start-up); ``models`` holds the
networks they share. Results go to
docs/benchmarks.md with the command that produced them.
"""
