"""When a save is due, as the hook sees it: the triggers between two ``step()`` calls, the hook's
own clock for time rules while no daemon owns the job, and preemption signals.
"""
