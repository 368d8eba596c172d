"""Transfer rules of the padding analysis, one module per op family.

Each family module holds its rules and its own table rows, ``ROWS`` (``(family label, rule, aten
op names)``), plus ``OVERLOADS`` where a single overload needs another rule than its packet;
``hpuopt.passes.padding.table`` assembles them. ``shapes`` holds the helpers families share.
"""
