"""Tuning our kernels with MetaSchedule: the tasks a model's buckets hold (``tasks``), measuring
candidates on valid inputs (``measure``), the search (``tune``), and the tuning log, its
format and its replay into a build (``log``). Reports and plots of a log are ``dlrmc.bench``'s.
"""
