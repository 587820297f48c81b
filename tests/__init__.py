"""The test files beside test_mvp.py, one per room; helpers.py holds what several of them share."""
